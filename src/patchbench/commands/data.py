"""`patchbench data`: list, download and prepare datasets (see patchbench.data)."""

from __future__ import annotations

import time

from patchbench.commands.options import add_progress_flag
from patchbench.config import MAX_SIZE, DataConfig
from patchbench.errors import UserError
from patchbench.values import coerce


def add_parser(sub):
    p = sub.add_parser("data", help="list, download and prepare datasets (decode once into a uint8 cache)")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    ls = dsub.add_parser("list", help="registered datasets, their URLs and MD5s")
    ls.add_argument("--cache-dir", default=None, help="cache directory (default: $PATCHBENCH_CACHE "
                    "or ~/.cache/patchbench)")
    ls.set_defaults(func=run_list)

    dl = dsub.add_parser("download", help="download, verify and extract a registered dataset")
    dl.add_argument("name", help="registered dataset name (see `patchbench data list`)")
    dl.add_argument("--md5", default=None, help="expected MD5, replacing the registered one")
    dl.add_argument("--cache-dir", default=None, help="cache directory (default: $PATCHBENCH_CACHE "
                    "or ~/.cache/patchbench)")
    dl.set_defaults(func=run_download)

    pr = dsub.add_parser("prepare", help="decode every image once into a memory-mappable uint8 cache")
    pr.add_argument("--data", default=DataConfig.source, help="registered name, archive "
                    "(.tgz/.tar.gz/.tar/.zip) or folder with train/<class>/ and val/<class>/ "
                    f"(default: {DataConfig.source})")
    pr.add_argument("--md5", default=None, help="expected MD5 of the archive")
    pr.add_argument("--img-size", default=str(DataConfig.prepare_size), dest="prepare_size", metavar="N",
                    help="stored resolution N: shorter side to N, centre crop NxN "
                    f"(default: {DataConfig.prepare_size})")
    pr.add_argument("--cache-dir", default=None, help="cache directory (default: $PATCHBENCH_CACHE "
                    "or ~/.cache/patchbench)")
    pr.add_argument("--workers", default=None, metavar="N", help="decoding processes (default: all cores)")
    add_progress_flag(pr)
    pr.set_defaults(func=run_prepare)


def _md5(text: str | None) -> str | None:
    from patchbench.config import check_setting, fields_of

    return check_setting(fields_of("data")["md5"], text) if text is not None else None


def run_list(args):
    from patchbench.data.imagenette import DATASETS, cache_root

    cache = cache_root(args.cache_dir)
    for d in DATASETS.values():
        here = "downloaded" if (cache / "downloads" / d.filename).exists() else "-"
        note = f"  ({d.note})" if d.note else ""
        print(f"{d.name:15s} {d.md5}  {here:10s} {d.url}{note}")
    print(f"cache: {cache}")


def run_download(args):
    from patchbench.data.imagenette import DATASETS, resolve_source

    if args.name not in DATASETS:
        raise UserError(f"data download {args.name}: not a registered dataset; choose one of {', '.join(DATASETS)} "
                        f"(a local archive or folder needs no download: pass it to --data)")
    root = resolve_source(args.name, cache_dir=args.cache_dir, md5=_md5(args.md5), download=True)
    print(f"{args.name}: {root}")


def run_prepare(args):
    from patchbench.data import prepare

    workers = coerce(args.workers, int, "--workers") if args.workers is not None else None
    if workers is not None and not 1 <= workers <= 1024:
        raise UserError(f"--workers {workers}: need a whole number in [1, 1024]")
    size = coerce(args.prepare_size, int, "--img-size")
    if not 1 <= size <= MAX_SIZE:
        raise UserError(f"--img-size {size}: need a whole number of pixels in [1, {MAX_SIZE}]")
    cfg = DataConfig(source=args.data, md5=_md5(args.md5), cache_dir=args.cache_dir, prepare_size=size)
    start = time.perf_counter()
    data = prepare(cfg, progress=args.progress, workers=workers)
    seconds = time.perf_counter() - start
    size = data.index["prepare_size"]
    what = "cache already valid, nothing decoded" if data.reused else f"prepared in {seconds:.1f} s"
    print(f"{args.data}: {len(data.train):,} train / {len(data.val):,} val images in "
          f"{len(data.classes)} classes at {size}x{size} ({what})")
    print(f"classes: {', '.join(data.classes)}")
    print(f"skipped unreadable images: {len(data.skipped)}")
    for s in data.skipped:
        print(f"  {s['path']}: {s['error']}")
    print(f"cache: {data.path}")
