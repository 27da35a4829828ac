"""Benchmark two-view augmentation: batched tensor ops vs. a per-image torchvision pipeline.

Both sides produce two SimCLR views of each image of a synthetic in-memory uint8 dataset, in
the same run:

- batched: ``TensorBatchLoader`` + ``SimCLRAugment`` on whole batches, on CPU with each
  of ``--threads`` torch intra-op thread counts (default 1 and torch's default), and on CUDA
  when present;
- per-image: ``torchvision.transforms.v2`` (RandomResizedCrop, RandomHorizontalFlip,
  RandomApply(ColorJitter, p=0.8), RandomGrayscale, GaussianBlur at >= 96 px, ToDtype,
  Normalize) applied twice per item in a DataLoader with 2 worker processes.

A second table cuts SwAV's multi-crop views (2 global + 6 local crops, at the 224 : 96
ratio scaled to ``--multicrop-sizes``) from in-memory images: ``MultiCropAugment`` batched
per crop size against a per-image torchvision pipeline per crop (SwAV's
``MultiCropDataset``) in ``--workers`` worker processes.

A third table reads JPEGs of ``--folder-size`` pixels written for the run, as a folder and as
tar shards (``scripts/make_shards.py``): this toolkit's folder reader and its shard reader
(workers decode with ``torchvision.io`` and cut both crops from the full image; the batched
augmentation does the rest in the main process, on the GPU when there is one, where
``data.decode=cuda`` rows decode there too) against torchvision's ``ImageFolder`` with the
per-image v2 pipeline, all with ``--workers`` workers, all producing two normalised
``--folder-size`` views per image.

A fourth table lists a generated tree of ``--listing-files`` empty ``.jpg`` files in 1,000
class folders (aged a day, as a dataset at rest): a ``Path`` object per file (the toolkit's
listing before), torchvision's ``make_dataset`` (``ImageFolder``'s), this toolkit's first
listing (which writes the index) and its start from the index (``find_images`` and the whole
``build_dataset``), each checked to list the same images.

Throughput is source images per second (each yielding two views), the median over timed
windows after warm-up. When other processes compete for the cores, torch's OpenMP threads
spin-wait and every parallel op can stall for a scheduler time slice; hence the single-thread
row, and ``OMP_WAIT_POLICY=PASSIVE`` avoids the stall. Usage:
``python scripts/bench_data.py [--quick] [--tables augment multicrop folder listing]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from baselines import (
    MultiCropDataset,
    TwoViewDataset,
    path_listing,
    torchvision_pipeline,
    two_view_folder,
)
from make_shards import main as make_shards
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from ssl_toolkit.data import (
    CropGroup,
    CropViews,
    InMemoryImageDataset,
    SimCLRAugment,
    TensorBatchLoader,
    WorkerBatchLoader,
    build_dataset,
    find_images,
)
from ssl_toolkit.data.device_decode import DeviceViews
from ssl_toolkit.data.listing import IMAGE_SUFFIXES


def bench_batched(
    images: torch.Tensor, batch_size: int, repeats: int, device: str, threads: int
) -> float:
    """Median images/s of loader + augmentation on ``device``, one batch per measurement."""
    torch.set_num_threads(threads)
    dataset = InMemoryImageDataset(images.to(device), torch.zeros(len(images), dtype=torch.long))
    loader = TensorBatchLoader(dataset, batch_size, generator=torch.Generator().manual_seed(0))
    augment = SimCLRAugment(generator=torch.Generator().manual_seed(1))

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    batches = iter(_forever(loader))
    for _ in range(3):
        augment(next(batches)[0])
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        views = augment(next(batches)[0])
        synchronize()
        times.append(time.perf_counter() - start)
        del views
    return batch_size / statistics.median(times)


def bench_torchvision(images: torch.Tensor, batch_size: int, windows: int, workers: int) -> float:
    """Median images/s of the per-image pipeline over windows of ``workers`` batches."""
    dataset = TwoViewDataset(images, torchvision_pipeline(images.shape[-1]))
    return _worker_rate(dataset, batch_size, windows, workers)


def _worker_rate(dataset, batch_size: int, windows: int, workers: int) -> float:
    """Median images/s of a shuffled ``DataLoader`` of ``dataset`` in ``workers`` workers."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    return _rate(_forever(loader), batch_size, workers, windows, warmup=2 * workers + 1)


def swav_crops(global_size: int, local_size: int) -> list[CropGroup]:
    """SwAV's ImageNet crops at other sizes: 2 of 14-100% and 6 of 5-14% of the image."""
    return [
        CropGroup(count=2, size=global_size, scale=(0.14, 1.0)),
        CropGroup(count=6, size=local_size, scale=(0.05, 0.14)),
    ]


def bench_multicrop_torchvision(
    images: torch.Tensor, crops: list[CropGroup], batch_size: int, windows: int, workers: int
) -> float:
    """Source images/s of SwAV's per-image ``MultiCropDataset`` pipeline in workers."""
    transforms = [
        torchvision_pipeline(g.size, scale=tuple(g.scale), blur_min_size=0)
        for g in crops
        for _ in range(g.count)
    ]
    return _worker_rate(MultiCropDataset(images, transforms), batch_size, windows, workers)


def bench_multicrop_batched(
    images: torch.Tensor, crops: list[CropGroup], batch_size: int, repeats: int, device: str
) -> float:
    """Source images/s of loader + ``MultiCropAugment`` (SwAV's policies) on ``device``."""
    dataset = InMemoryImageDataset(images.to(device), torch.zeros(len(images), dtype=torch.long))
    batches = _forever(TensorBatchLoader(dataset, batch_size, generator=torch.Generator()))
    augment = SimCLRAugment(blur_min_size=0, generator=torch.Generator().manual_seed(1))
    augment.with_crops(crops)

    def work(batch):
        views = augment(batch[0])
        if device == "cuda":
            torch.cuda.synchronize()
        return views

    return _rate(batches, batch_size, 1, repeats, warmup=3, work=work)


def _forever(loader):
    while True:
        yield from loader


def write_jpegs(folder: Path, count: int, size: int = 224) -> None:
    """``count`` smooth random ``size`` x ``size`` JPEGs, in one class folder."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    (folder / "images").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        low = torch.rand(3, 6, 8, generator=generator)
        pixels = TF.resize(low, [size, size], antialias=True).mul(255).round().clamp(0, 255)
        Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy()).save(
            folder / "images" / f"{i:04d}.jpg", quality=90
        )


def _rate(
    batches: Iterator,
    batch_size: int,
    count: int,
    windows: int,
    *,
    warmup: int,
    work=lambda batch: batch,
) -> float:
    """Median images/s over ``windows`` windows of ``count`` batches, after ``warmup``
    batches (with workers: the start-up and the batches they prefetched meanwhile)."""
    for _ in range(warmup):
        work(next(batches))
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(count):
            work(next(batches))
        rates.append(count * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_folder(
    folder: Path, shards: Path, size: int, batch_size: int, workers: int, count: int, windows: int
) -> list[tuple[str, float]]:
    """Images/s of two augmented views per image: torchvision's ``ImageFolder``, this
    toolkit's folder reader and its shard reader (and decoding on the GPU, with one)."""
    baseline_loader = DataLoader(
        two_view_folder(str(folder), size),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    warmup = 2 * workers + 1
    rows = [
        (
            "torchvision ImageFolder (PIL) + v2 per image",
            _rate(_forever(baseline_loader), batch_size, count, windows, warmup=warmup),
        )
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    augment = SimCLRAugment(size, generator=torch.Generator(device).manual_seed(1)).to(device)
    readers = [("imagefolder", folder, "cpu"), ("shards", shards, "cpu")]
    if device == "cuda":
        readers += [("imagefolder", folder, "cuda"), ("shards", shards, "cuda")]
    for name, root, decode in readers:
        views = CropViews(size=size, decode=decode)
        dataset = build_dataset(name, root=root, views=views)
        loader = WorkerBatchLoader(
            dataset, batch_size, generator=torch.Generator().manual_seed(0), num_workers=workers
        )
        on_device = DeviceViews(views, decode) if decode != "cpu" else None

        def work(batch, on_device=on_device):
            images = on_device(batch[0]) if on_device else tuple(x.to(device) for x in batch[0])
            views = augment(images)
            if device == "cuda":
                torch.cuda.synchronize()
            return views

        where = "decoded on the GPU" if decode == "cuda" else "torchvision.io decode in workers"
        reader = "folder reader" if name == "imagefolder" else "shard reader"
        rate = _rate(_forever(loader), batch_size, count, windows, warmup=warmup, work=work)
        rows.append((f"{reader}: {where}, crops, batched augmentation ({device})", rate))
    return rows


def write_empty_tree(root: Path, count: int, classes: int = 1000) -> None:
    """``count`` empty ``.jpg`` files in ``classes`` class folders, all folders aged a day."""
    day = 86_400 * 10**9
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c * count // classes, (c + 1) * count // classes):
            (folder / f"{i:08d}.jpg").touch()
        mtime = os.stat(folder).st_mtime_ns - day
        os.utime(folder, ns=(mtime, mtime))
    mtime = os.stat(root).st_mtime_ns - day
    os.utime(root, ns=(mtime, mtime))


def _seconds(fn, repeats: int = 1) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_listing(count: int, repeats: int) -> list[tuple[str, float]]:
    """Seconds to list (or start from the index of) a tree of ``count`` empty images."""
    from torchvision.datasets.folder import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_empty_tree(root, count)
        classes = sorted(entry.name for entry in os.scandir(root))
        index = {name: label for label, name in enumerate(classes)}
        extensions = tuple(IMAGE_SUFFIXES)
        path_time, baseline = _seconds(lambda: path_listing(root, IMAGE_SUFFIXES))
        tv_time, tv = _seconds(lambda: make_dataset(str(root), index, extensions=extensions))
        kept = Path(tmp) / "indexes"  # not the user's cache
        first_time, first = _seconds(lambda: find_images(root, index_dir=kept))
        cached_time, cached = _seconds(lambda: find_images(root, index_dir=kept), repeats)
        start_time, dataset = _seconds(
            lambda: build_dataset("imagefolder", root=root, index_dir=kept), repeats
        )
        expected = [(str(path), label) for path, label in baseline]
        for name, listed in (("ours", first), ("index", cached)):
            if list(zip(listed.paths, listed.labels, strict=True)) != expected:
                raise SystemExit(f"the {name} listing differs from the Path listing")
        if sorted(tv) != sorted(expected) or len(dataset) != round(0.8 * count):
            raise SystemExit("torchvision's listing or the dataset's split differs")
    return [
        ("a Path per file, Path sorting (the toolkit's listing before)", path_time),
        ("torchvision make_dataset (ImageFolder's listing)", tv_time),
        ("find_images, first listing (writes the index)", first_time),
        (f"find_images from the index (median of {repeats})", cached_time),
        (f"build_dataset('imagefolder') from the index (median of {repeats})", start_time),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 minute)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument(
        "--multicrop-sizes",
        type=int,
        nargs=2,
        default=[112, 48],
        help="global and local crop sizes (the source images are the global size)",
    )
    parser.add_argument("--folder-size", type=int, default=224, help="view size, JPEG folder")
    parser.add_argument("--folder-batch", type=int, default=64, help="batch, JPEG folder")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, torch.get_num_threads()}),
        help="torch intra-op thread counts to run the batched CPU pipeline with",
    )
    parser.add_argument(
        "--listing-files", type=int, default=200_000, help="empty images in the listing tree"
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=TABLES,
        default=list(TABLES),
        help="the tables to measure (default: all)",
    )
    args = parser.parse_args()
    console = Console(width=120)
    if "augment" in args.tables:
        bench_augment(args, console)
    if "multicrop" in args.tables:
        bench_multicrop(args, console)
    if "folder" in args.tables:
        bench_folder_table(args, console)
    if "listing" in args.tables:
        bench_listing_table(args, console)


TABLES = ("augment", "multicrop", "folder", "listing")


def _runs(args: argparse.Namespace) -> list[tuple[str, int]]:
    runs = [("cpu", threads) for threads in args.threads]
    if torch.cuda.is_available():
        runs.append(("cuda", max(args.threads)))
    return runs


def bench_augment(args: argparse.Namespace, console: Console) -> None:
    """The two-view augmentation table."""
    repeats, windows = (5, 3) if args.quick else (20, 8)
    runs = _runs(args)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    table = Table(
        title=f"Two-view SimCLR augmentation, batch {args.batch_size}, OMP_WAIT_POLICY={policy}"
    )
    for column in ("size", "pipeline", "device", "threads", "images/s (median)", "speed-up"):
        table.add_column(column, justify="left" if column == "pipeline" else "right", no_wrap=True)
    speedups = []
    for size in args.sizes:
        generator = torch.Generator().manual_seed(size)
        n = args.batch_size * (2 * args.workers + 1 + windows * args.workers)
        shape = (n, 3, size, size)
        images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        baseline = bench_torchvision(images, args.batch_size, windows, args.workers)
        pipeline = f"torchvision v2 per image, {args.workers} workers"
        table.add_row(str(size), pipeline, "cpu", "1 each", f"{baseline:,.0f}", "1.0x")
        for device, threads in runs:
            rate = bench_batched(images, args.batch_size, repeats, device, threads)
            speedup = f"{rate / baseline:.1f}x"
            speedups.append(f"{size} px {device} {threads} thread(s) {speedup}")
            table.add_row(
                str(size), "batched SimCLRAugment", device, str(threads), f"{rate:,.0f}", speedup
            )
    console.print(table)
    console.print("speed-up over per-image torchvision: " + ", ".join(speedups), highlight=False)


def bench_multicrop(args: argparse.Namespace, console: Console) -> None:
    """The multi-crop table."""
    repeats, windows = (5, 3) if args.quick else (20, 8)
    runs = _runs(args)
    global_size, local_size = args.multicrop_sizes
    crops = swav_crops(global_size, local_size)
    multicrop = Table(
        title=f"SwAV multi-crop, 2 x {global_size} + 6 x {local_size} px per image, batch "
        f"{args.batch_size}, median of {windows}"
    )
    for column in ("pipeline", "device", "threads", "images/s", "speed-up"):
        multicrop.add_column(column, justify="left" if column == "pipeline" else "right")
    n = args.batch_size * (2 * args.workers + 1 + windows * args.workers)
    images = torch.randint(
        0,
        256,
        (n, 3, global_size, global_size),
        generator=torch.Generator().manual_seed(7),
        dtype=torch.uint8,
    )
    baseline = bench_multicrop_torchvision(images, crops, args.batch_size, windows, args.workers)
    multicrop.add_row(
        f"torchvision v2 per image and crop, {args.workers} workers",
        "cpu",
        "1 each",
        f"{baseline:,.0f}",
        "1.0x",
    )
    for device, threads in runs:
        torch.set_num_threads(threads)
        rate = bench_multicrop_batched(images, crops, args.batch_size, repeats, device)
        multicrop.add_row(
            "batched MultiCropAugment",
            device,
            str(threads),
            f"{rate:,.0f}",
            f"{rate / baseline:.1f}x",
        )
    console.print(multicrop)


def bench_folder_table(args: argparse.Namespace, console: Console) -> None:
    """The JPEG folder table."""
    count, windows = (3, 1) if args.quick else (5, 3)
    threads = max(args.threads)
    torch.set_num_threads(threads)  # the batched augmentation's, in the main process
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        write_jpegs(folder, args.folder_batch * (count + 2 + 2 * args.workers))
        shard_size = str(max(1, args.folder_batch))
        with contextlib.redirect_stdout(io.StringIO()):
            make_shards([str(folder), str(shards), "--shard-size", shard_size])
        rows = bench_folder(
            folder,
            shards / "train",
            args.folder_size,
            args.folder_batch,
            args.workers,
            count,
            windows,
        )
    title = (
        f"JPEG folder ({args.folder_size} x {args.folder_size}), two {args.folder_size} px "
        f"views per image, batch {args.folder_batch}, {args.workers} workers each, {threads} "
        f"torch threads, median of {windows}"
    )
    console.print(_against_first(title, ("pipeline", "images/s"), rows, rate=True))


def bench_listing_table(args: argparse.Namespace, console: Console) -> None:
    """The listing table."""
    rows = bench_listing(args.listing_files, repeats=3 if args.quick else 5)
    title = f"Listing {args.listing_files:,} empty .jpg files in 1,000 class folders (warm cache)"
    console.print(_against_first(title, ("listing", "seconds"), rows, rate=False))


def _against_first(
    title: str, columns: tuple[str, str], rows: list[tuple[str, float]], *, rate: bool
) -> Table:
    """A table of ``rows`` (name, value) with each one's speed-up over the first: values are
    rates (higher is faster) or times."""
    table = Table(title=title)
    for column in (*columns, "speed-up"):
        table.add_column(column, justify="left" if column == columns[0] else "right")
    baseline = rows[0][1]
    for name, value in rows:
        speed_up = value / baseline if rate else baseline / value
        table.add_row(name, f"{value:,.0f}" if rate else f"{value:.3f}", f"{speed_up:.2f}x")
    return table


if __name__ == "__main__":
    main()
