"""Prepare a data set and show its splits: python -m gcp_jax.data NAME [--data_dir D] [--manual_dir M].

Run it once before a multi-host run, so that the processes do not all prepare the data at once.
"""

import argparse
import sys

from gcp_jax.config import resolve_data
from gcp_jax.data import sources


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcp_jax.data", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=sources.KNOWN)
    parser.add_argument("--data_dir", default="", help="TFDS data directory (default: TFDS's)")
    parser.add_argument("--manual_dir", default="", help="folder with the downloaded files, or image_folder's root")
    args = parser.parse_args(argv)
    try:
        src = sources.open_source(resolve_data(vars(args)))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = ", ".join(src.class_names[:5]) + (", ..." if len(src.class_names) > 5 else "")
    print(f"{src.name}: {len(src.class_names)} classes ({names})")
    for split, size in src.split_sizes.items():
        print(f"  {split}: {size} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
