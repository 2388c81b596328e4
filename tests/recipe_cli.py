"""Running the commands users run (fairseq-hydra-train on the tiny recipes, the preprocessing
modules, fairseq-validate/-generate) as subprocesses with one thread each, for the tests that
prove the recipes learn."""
import os
import subprocess
import sys

import avplugins

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
USER_DIR = os.path.dirname(os.path.abspath(avplugins.__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(command, timeout):
    """Run ``command`` from the repository root; its stdout + stderr (asserts it succeeded)."""
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def hydra_train(conf, group, save_dir, overrides, timeout=400):
    """``fairseq-hydra-train`` on ``conf/group/tiny_synthetic.yaml`` saving to ``save_dir``."""
    return run(
        [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(conf, group),
         "--config-name", "tiny_synthetic", f"common.user_dir={USER_DIR}", f"checkpoint.save_dir={save_dir}",
         f"hydra.run.dir={save_dir}/hydra", *overrides],
        timeout,
    )
