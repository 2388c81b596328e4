"""``python -m avplugins --user-dir`` prints the directory to pass as fairseq's user dir."""
import argparse
import os

import avplugins


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m avplugins")
    parser.add_argument(
        "--user-dir",
        action="store_true",
        help="print the directory to pass as fairseq's --user-dir / common.user_dir",
    )
    args = parser.parse_args(argv)
    if args.user_dir:
        print(os.path.dirname(os.path.abspath(avplugins.__file__)))
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
