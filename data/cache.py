"""Latent and text-embedding cache: encode once, on all processes, reuse across runs.

Layout, per dataset folder: `<folder>/cache/<model type>/latents/` and `.../text/`
(`TensorStore`s), plus `<folder>/cache/file_hashes.json` (content hashes of the media files,
recomputed only when a file's size or modification time changes).

Every cache entry is keyed by what decides its content: a latent by the file's content hash,
the bucket shape (frames included), the clip's first frame, the model's latent signature and
its loss mask's content hash (the mask is stored with the latent, at the latent's size and
frame count); a
text embedding by the caption and the model's text signature. So a changed image, caption,
resolution, bucket or model re-encodes just the entries that changed, and `--regenerate_cache`
is only needed to start over.

A cache that was deleted, or whose parts were damaged, between runs is rebuilt: the missing
entries are simply encoded again (damaged parts are reported and removed). Encoded entries are
written out every ROWS_PER_PART rows or FLUSH_SECONDS, so a run killed while caching loses at
most that much work, and the next run encodes only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data.buckets import Sample
from data.media import load_mask, load_sample_pixels_uint8, to_unit_range
from data.tensor_store import TensorStore
from utils.atomic import write_text_atomic
from utils.dist import Distributed, available_cores, local_processes
from utils.errors import MediaError
from utils.faults import disk_full, disk_full_error

HASH_INDEX_NAME = "file_hashes.json"
# A cache part is written when this many entries of a folder are pending, or when the oldest
# pending one has waited this long: what a killed run can lose.
ROWS_PER_PART = 256
FLUSH_SECONDS = 120.0


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hashes(paths: list[Path], cache_root: Path) -> dict[Path, str]:
    """Content hashes of `paths`, reusing `cache_root/file_hashes.json` for unchanged files."""
    index_path = cache_root / HASH_INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    result, changed = {}, False
    for path in paths:
        st = path.stat()
        rel = os.path.relpath(path, cache_root.parent)
        entry = index.get(rel)
        if not entry or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _file_sha256(path)}
            index[rel] = entry
            changed = True
        result[path] = entry["sha256"]
    if changed:
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(index_path, json.dumps(index, indent=0, sort_keys=True))
        except OSError as e:
            if disk_full(e, cache_root):
                raise disk_full_error(index_path, "the file hash index", "The cache is unchanged.") from e
            raise
    return result


@dataclass(frozen=True)
class CachedSample:
    """A training sample and where its tensors live in the cache; `empty_key`, for a sample with
    caption dropout, is the empty caption's entry (one per folder); `variants`, with caption
    shuffling, the (caption, entry) of each shuffled variant."""

    sample: Sample
    latent_key: str
    text_key: str
    folder: Path
    empty_key: str | None = None
    variants: tuple[tuple[str, str], ...] = ()


def shuffled_captions(caption: str, count: int, keep_tokens: int) -> list[str]:
    """`count` orders of the caption's comma-separated tags, the first `keep_tokens` kept in
    place, joined with ", ". Each order is seeded by the caption and its number alone, so a
    caption has the same variants in every run and process (and they are cached once)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    out = []
    for k in range(count):
        order = list(tail)
        # str seeds are hashed with SHA-512 by random.Random: the same in every process.
        random.Random(f"{caption}\x1f{k}").shuffle(order)
        out.append(", ".join(head + order))
    return out


def cache_dir(folder: Path, model_name: str) -> Path:
    """Where model type `model_name` caches the items of dataset folder `folder`."""
    return folder / "cache" / model_name


def remove_caches(folders, model_name: str) -> None:
    """Delete model type `model_name`'s cache in each of `folders` (for --regenerate_cache)."""
    for folder in folders:
        shutil.rmtree(cache_dir(folder, model_name), ignore_errors=True)


@dataclass(frozen=True)
class _Text:
    """A text to embed: a caption, or a sample prompt; stored in `folder`'s text store."""

    caption: str
    text_key: str
    folder: Path


class DatasetCache:
    """The cache stores of every dataset folder a run uses, for one model type.

    `prompts` (the [sample] prompts and negative prompt) are embedded with the captions, into the
    first folder's text store, keyed as a caption: a prompt that is also a caption is stored once.
    Without samples, `text_folder` is that folder (prompts only: tools/sample.py).
    """

    def __init__(self, model, samples: list[Sample], prompts: list[str] = (), text_folder: Path | None = None):
        self.model = model
        self.samples = samples
        self.prompts = list(dict.fromkeys(prompts))
        self.folders = sorted({s.item.path.parent for s in samples}) or [text_folder]

    def cache_dir(self, folder: Path) -> Path:
        return cache_dir(folder, self.model.name)

    def _keys(self) -> list[CachedSample]:
        latent_sig, text_sig = self.model.latent_cache_signature(), self.model.text_cache_signature()
        hashes: dict[Path, str] = {}
        for folder in self.folders:
            paths = sorted({p for s in self.samples if s.item.path.parent == folder
                            for p in (s.item.path, s.item.mask) if p is not None})
            hashes.update(content_hashes(paths, folder / "cache"))
        out = []
        for s in self.samples:
            b = s.bucket
            # Clips of one video differ by their first frame: each is an entry of its own.
            latent_key = _sha(hashes[s.item.path], f"{b.width}x{b.height}x{b.frames}@{s.clip_start}", latent_sig,
                              *(("mask", hashes[s.item.mask]) if s.item.mask is not None else ()))
            empty_key = _sha("", text_sig) if s.caption_dropout > 0 else None
            variants = tuple((v, _sha(v, text_sig)) for v in
                             shuffled_captions(s.item.caption, s.caption_shuffle_variants, s.keep_tokens))
            out.append(CachedSample(s, latent_key, _sha(s.item.caption, text_sig), s.item.path.parent, empty_key,
                                    variants))
        return out

    def build(self, place: Distributed, batch_size: int, log=None, workers: int = 0) -> "CacheReader":
        """Encode what is missing (all ranks share the work; rank 0 writes, and on a node that
        does not see its cache folder, that node's first rank) and open the stores.

        `workers` processes per rank decode and resize the media files ahead of the VAE (0: this
        process does, between batches); the cache is the same either way. Damaged cache parts are
        reported through `log` (rank 0) and their entries encoded again.
        """
        keyed = place.broadcast_object(self._keys() if place.is_main else None)
        # Who writes: rank 0, and on nodes that do not see rank 0's cache folder, their lowest rank.
        leaders = place.folder_leaders(self.cache_dir(self.folders[0]))
        writers = sorted(set(leaders))
        writer = place.rank in writers
        if len(writers) > 1 and place.is_main and log is not None:
            log(f"cache: {self.cache_dir(self.folders[0])} is not one folder for every rank (nodes without a shared "
                f"filesystem): ranks {', '.join(map(str, writers))} each write the cache where their node sees it")
        problems: list[tuple[Path, str]] = []
        text_stores = {f: TensorStore(self.cache_dir(f) / "text") for f in self.folders}
        latent_stores = {f: TensorStore(self.cache_dir(f) / "latents") for f in self.folders}
        damaged = [d for stores in (text_stores, latent_stores) for store in stores.values() for d in store.damaged]
        if damaged and place.is_main and log is not None:
            log(f"cache: {len(damaged)} damaged part(s) are left out, removed, and their entries encoded again:\n"
                + "\n".join(f"  {path}: {reason}" for path, reason in damaged))
        if damaged and writer:
            for stores in (text_stores, latent_stores):
                for store in stores.values():
                    store.remove_leftovers()

        # Unique per folder: each folder has its own stores, so a caption (or image) that two
        # folders share is encoded for each of them.
        # The empty caption (caption dropout, once per folder) and shuffled captions: entries of their own.
        extra = [_with_caption(c, "", c.empty_key) for c in keyed if c.empty_key]
        extra += [_with_caption(c, caption, key) for c in keyed for caption, key in c.variants]
        text_sig = self.model.text_cache_signature()
        texts = [_Text(c.sample.item.caption, c.text_key, c.folder) for c in keyed + extra]
        texts += [_Text(p, _sha(p, text_sig), self.folders[0]) for p in self.prompts]
        todo_text = _unique((((c.folder, c.text_key), c)
                             for c in _missing(texts, text_stores, lambda c: c.text_key, place, writers)))
        if todo_text:
            self.model.load_text_encoders(place.device)
            problems += _encode_distributed(
                todo_text, text_stores, batch_size, place, writers, "Caching text embeddings",
                group_of=lambda c: "",
                encode=lambda batch: self.model.encode_captions([c.caption for c in batch]))
            self.model.free_encoders()

        todo_latents = _unique((((c.folder, c.latent_key), c)
                                for c in _missing(keyed, latent_stores, lambda c: c.latent_key, place, writers)))
        if todo_latents:
            self.model.load_vae(place.device)

            def encode_images(loaded: list["_LoadedMedia"]):
                pixels = to_unit_range(torch.stack([m.pixels for m in loaded]))
                outputs = self.model.encode_pixels(pixels)
                for m, out in zip(loaded, outputs):
                    if m.mask is not None:
                        out["mask"] = latent_mask(m.mask, out["latents"])
                return outputs

            problems += _encode_distributed(todo_latents, latent_stores, batch_size, place, writers, "Caching latents",
                                            group_of=lambda c: c.sample.bucket, encode=encode_images,
                                            key_of=lambda c: c.latent_key, load=load_media, workers=workers)
            self.model.free_encoders()
        place.barrier()
        # Re-open so every rank sees the parts its node's writer wrote.
        text_stores = {f: TensorStore(self.cache_dir(f) / "text") for f in self.folders}
        latent_stores = {f: TensorStore(self.cache_dir(f) / "latents") for f in self.folders}
        # Entries written now; files that failed to load (see problems) are not counted.
        encoded = (sum(c.text_key in text_stores[c.folder] for c in todo_text)
                   + sum(c.latent_key in latent_stores[c.folder] for c in todo_latents))
        bad = {p for p, _ in problems}
        usable = [c for c in keyed if c.sample.item.path not in bad
                  and c.latent_key in latent_stores[c.folder] and all(k in text_stores[c.folder] for k in _text_keys(c))]
        prompt_keys = {p: (self.folders[0], _sha(p, text_sig)) for p in self.prompts}
        return CacheReader(usable, latent_stores, text_stores, problems, encoded, prompt_keys)


def latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A pixel mask as weights of the latent elements, averaged over the pixels each latent
    element covers, shaped to broadcast over `latents`.

    A mask image (1, height, width) gives (1, h, w), or (1, 1, h, w) for video latents
    (channels, frames, h, w): one weight map for every frame. Masks per frame (1, frames, height,
    width) give (1, latent frames, h, w): the video VAEs here are causal, so latent frame 0 holds
    pixel frame 0 alone and each later one the next (frames - 1) / (latent frames - 1) frames
    (4 for HunyuanVideo and Wan, 8 for LTX-Video); each weighs the mean of its frames."""
    h, w = latents.shape[-2:]
    if mask.dim() == 4 and latents.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]  # a one-frame clip of a video for an image model
    if mask.dim() == 3:
        small = torch.nn.functional.interpolate(mask[None].float(), size=(h, w), mode="area")[0]
        return small.view(1, *([1] * (latents.dim() - 3)), h, w)
    frames, latent_frames = mask.shape[1], (latents.shape[1] if latents.dim() == 4 else 0)
    group = (frames - 1) // max(latent_frames - 1, 1)
    if latent_frames < 1 or (latent_frames == 1 and frames != 1) or group * (latent_frames - 1) != frames - 1:
        raise ValueError(f"a mask of {frames} frames does not fit a latent of {latent_frames} frames")
    small = torch.nn.functional.interpolate(mask.float().transpose(0, 1), size=(h, w), mode="area").transpose(0, 1)
    later = small[:, 1:].reshape(1, latent_frames - 1, group, h, w).mean(dim=2)
    return torch.cat([small[:, :1], later], dim=1)


def _text_keys(c: CachedSample) -> list[str]:
    """Every text entry a sample may use: its caption's, the empty caption's, its variants'."""
    return [c.text_key] + ([c.empty_key] if c.empty_key else []) + [k for _, k in c.variants]


def _with_caption(c: CachedSample, caption: str, text_key: str) -> CachedSample:
    """`c` standing for another caption of its item, to be encoded under `text_key`."""
    item = dataclasses.replace(c.sample.item, caption=caption)
    return dataclasses.replace(c, text_key=text_key, sample=dataclasses.replace(c.sample, item=item))


def _unique(pairs) -> list:
    seen, out = set(), []
    for key, value in pairs:
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


@dataclass(frozen=True)
class _LoadedMedia:
    """A sample's pixels fitted to its bucket ((3, frames, height, width) uint8) and its loss
    mask at the bucket's size, or why the files could not be read."""

    pixels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    error: str | None = None


def load_media(batch: list[CachedSample]) -> list[_LoadedMedia]:
    """Read and fit the media files (and masks) of a batch; a file that cannot be read is an
    error entry, not an exception, so the rest of the batch is kept."""
    out = []
    for c in batch:
        s, b = c.sample, c.sample.bucket
        try:
            pixels = load_sample_pixels_uint8(s.item.path, b.width, b.height, b.frames, s.clip_start)
            mask = (load_mask(s.item.mask, b.width, b.height, b.frames, s.clip_start)
                    if s.item.mask is not None else None)
        except MediaError as e:
            # The message starts with the path; the problem list shows it already.
            out.append(_LoadedMedia(error=str(e).removeprefix(f"{s.item.path}: ")))
        else:
            out.append(_LoadedMedia(pixels, mask))
    return out


def default_caching_workers() -> int:
    """Processes per rank that read media files while caching: the cores this process may use,
    shared by the ranks on this machine, at most 8 (more seldom keeps a GPU busier)."""
    return min(8, available_cores() // local_processes(os.environ))


class _BatchLoads(torch.utils.data.Dataset):
    """Batch i of `batches`, read by `load`: what a DataLoader worker computes."""

    def __init__(self, batches: list[list], load):
        self.batches, self.load = batches, load

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.load(self.batches[index])


def _as_is(batch):
    return batch


def _loaded(batches: list[list], load, workers: int, pin: bool):
    """`load(batch)` for each batch, in order. With workers, they read ahead in worker processes,
    at most two batches each, while the caller encodes: order and contents are the same."""
    workers = min(workers, len(batches))
    if load is None or workers < 1 or len(batches) < 2:
        for batch in batches:
            yield load(batch) if load is not None else batch
        return
    yield from torch.utils.data.DataLoader(_BatchLoads(batches, load), batch_size=None, shuffle=False,
                                           num_workers=workers, prefetch_factor=2, collate_fn=_as_is,
                                           pin_memory=pin)


def _missing(entries, stores, key_of, place: Distributed, writers: list[int]) -> list:
    """The `entries` whose key the store of some writer lacks: the same list on every rank."""
    if len(writers) == 1:  # one cache folder, which every rank reads alike
        return [c for c in entries if key_of(c) not in stores[c.folder]]
    lacking = {(c.folder, key_of(c)) for c in entries if key_of(c) not in stores[c.folder]} \
        if place.rank in writers else set()
    union = set().union(*place.all_gather_object(lacking))
    return [c for c in entries if (c.folder, key_of(c)) in union]


def _encode_distributed(todo, stores, batch_size, place: Distributed, writers: list[int], desc, group_of, encode,
                        key_of=lambda c: c.text_key, load=None, workers: int = 0) -> list[tuple[Path, str]]:
    """Encode `todo` in same-shape batches spread over all ranks; the `writers` (rank 0, and one
    rank per node that does not share its folders) gather the results and write what their
    stores lack.

    `load` (with `workers` processes reading ahead) turns a batch into what `encode` takes, a
    `_LoadedMedia` per item; without it `encode` takes the batch itself. Items that fail to load
    are skipped, never a crash mid-cache, and returned (path, reason), the same list on every rank.
    """
    problems: list[tuple[Path, str]] = []  # rank 0's, then broadcast
    rank, world = place.rank, place.world
    groups: dict = {}
    for c in todo:
        groups.setdefault(group_of(c), []).append(c)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    rounds = range(0, len(batches), world)
    my_batches = [batches[start + rank] if start + rank < len(batches) else [] for start in rounds]
    loaded_batches = _loaded(my_batches, load, workers, pin=place.device.type == "cuda")
    pending: dict[Path, list] = {}
    pending_since: dict[Path, float] = {}
    bar = tqdm(total=len(todo), desc=desc, unit="item", disable=rank != 0, dynamic_ncols=True)
    for mine in my_batches:
        loaded = next(loaded_batches)
        rows, my_problems = [], []
        bad = {i: m.error for i, m in enumerate(loaded) if isinstance(m, _LoadedMedia) and m.error is not None}
        if mine and not bad:
            with torch.no_grad():
                outputs = encode(loaded)
            rows = [(key_of(c), c.folder, {k: v.cpu() for k, v in out.items()}) for c, out in zip(mine, outputs)]
        elif mine:
            # A bad file in the batch: the rest are encoded one by one.
            for i, (c, m) in enumerate(zip(mine, loaded)):
                if i in bad:
                    my_problems.append((c.sample.item.path, bad[i]))
                    continue
                with torch.no_grad():
                    (out,) = encode([m])
                rows.append((key_of(c), c.folder, {k: v.cpu() for k, v in out.items()}))
        # With one writer the results go to it alone; with several, to every rank.
        gathered = place.gather_object((rows, my_problems)) if len(writers) == 1 else \
            place.all_gather_object((rows, my_problems))
        if place.rank in writers:
            for r, p in gathered:
                if place.is_main:
                    problems.extend(p)
                for key, folder, tensors in r:
                    if key in stores[folder]:
                        continue  # this writer's copy has it; another writer's lacked it
                    pending.setdefault(folder, []).append((key, tensors))
                    pending_since.setdefault(folder, time.monotonic())
                bar.update(len(r) + len(p))
            for folder, folder_rows in pending.items():
                waited = time.monotonic() - pending_since.get(folder, time.monotonic())
                if folder_rows and (len(folder_rows) >= ROWS_PER_PART or waited >= FLUSH_SECONDS):
                    stores[folder].write_part(folder_rows)
                    folder_rows.clear()
                    pending_since.pop(folder, None)
    if place.rank in writers:
        for folder, folder_rows in pending.items():
            stores[folder].write_part(folder_rows)
    bar.close()
    return place.broadcast_object(problems if place.is_main else None)


class CacheReader:
    """Cached tensors of the usable samples, read from the memory-mapped stores."""

    def __init__(self, samples: list[CachedSample], latent_stores, text_stores, problems, encoded: int,
                 prompt_keys: dict[str, tuple[Path, str]] | None = None):
        self.samples = samples
        self.prompt_keys = prompt_keys or {}
        self.latent_stores = latent_stores
        self.text_stores = text_stores
        self.problems = problems
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, text_key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The sample's latents and text embeddings: its caption's, or those of `text_key` (the
        empty caption's or a shuffled variant's entry)."""
        c = self.samples[index]
        return self.latent_stores[c.folder].get(c.latent_key), self.text_stores[c.folder].get(text_key or c.text_key)

    def prompt_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """The cached text embedding of a sample prompt (one given to the cache as `prompts`)."""
        folder, text_key = self.prompt_keys[prompt]
        return self.text_stores[folder].get(text_key)
