"""The plugin installs, imports through fairseq's --user-dir and prints its directory."""
import os
import subprocess
import sys

import avplugins


def test_user_dir_helper_prints_package_directory():
    out = subprocess.run(
        [sys.executable, "-m", "avplugins", "--user-dir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == os.path.dirname(os.path.abspath(avplugins.__file__))
    assert os.path.isfile(os.path.join(out, "__init__.py"))


def test_fairseq_imports_plugin_as_user_dir():
    code = (
        "from argparse import Namespace\n"
        "from fairseq import utils\n"
        f"utils.import_user_module(Namespace(user_dir={os.path.dirname(avplugins.__file__)!r}))\n"
        "import sys; assert 'avplugins' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
