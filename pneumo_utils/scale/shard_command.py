"""``pneumo shards``: write a data set into TFRecord shards, or verify a folder.

Command line::

    pneumo shards --data-root DIR --out DIR [--image-size 224] [--shard-mb 100]
    pneumo shards --out DIR --verify
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pneumo_utils.cli import fail
from pneumo_utils.scale.shard_manifest import IMAGE_FORMATS
from pneumo_utils.sidecar import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumo shards",
        description="Write a data set (Kermany folders or the NIH table) into TFRecord shards "
                    "with a manifest, or verify a shards folder.",
    )
    parser.add_argument("--data-root", help="Kermany data root, or NIH folder / labels CSV")
    parser.add_argument("--out", required=True, help="shards folder (created; reruns resume)")
    parser.add_argument("--kind", choices=("auto", "kermany", "nih"), default="auto")
    parser.add_argument("--image-size", type=int, default=224,
                        help=f"stored image side in px, {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE}; 0 keeps "
                             "the original files (default 224)")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpeg", dest="image_format")
    parser.add_argument("--shard-mb", type=float, default=100.0, help="target shard size (MB)")
    parser.add_argument("--min-shards", type=int, default=8,
                        help="at least this many shards per split, for up to that many workers")
    parser.add_argument("--finding", default="Pneumonia", help="NIH positive finding")
    parser.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                        help="NIH: downsample normals to the positives (default on)")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="NIH only")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=None, help="encoding threads")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard of --out against the manifest and index.csv "
                             "(checksums, rows, labels, image headers) and exit")
    args = parser.parse_args(argv)
    if not args.verify and not args.data_root:
        parser.error("--data-root is required to write shards")
    if args.image_size != 0 and not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        return fail(f"--image-size {args.image_size} px is outside {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} "
                    "(the model input range); pass a side in that range, or 0 to keep the original files")
    from pneumo_utils.scale.shard_reader import verify_shards
    from pneumo_utils.scale.shard_writer import load_index, write_shards

    try:
        if args.verify:
            manifest = verify_shards(args.out)
            print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['images']} images, "
                  "all match the manifest")
            return 0
        index, rule = load_index(args.data_root, args.kind, args.finding, args.balance,
                                 args.val_fraction, args.test_fraction, args.seed)
        root = Path(args.data_root).expanduser()
        manifest = write_shards(index, args.out, data_root=root.parent if root.is_file() else root,
                                image_size=args.image_size, image_format=args.image_format,
                                shard_mb=args.shard_mb, min_shards=args.min_shards,
                                split_rule=rule, workers=args.workers)
    except (OSError, ValueError) as exc:
        return fail(exc)
    except Exception as exc:  # TensorFlow's OpError (DataLossError...) is not a ValueError
        if type(exc).__module__.startswith("tensorflow"):
            return fail(f"{args.out}: {exc}")
        raise
    for split, counts in manifest["counts"].items():
        print(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
