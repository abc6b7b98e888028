"""The [sample] table: pictures (or videos) drawn from fixed prompts during training, read by
training/sampling.py. Declared in config/ so that config imports nothing above it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from config.schema import check, key, path_is, required, resolve_path
from utils.errors import ConfigError


@dataclass
class SamplePrompt:
    """One sample prompt with settings of its own; a key left out takes the [sample] value."""

    prompt: str = required()
    seed: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    frames: Optional[int] = None
    guidance: Optional[float] = None


@dataclass
class SampleConfig:
    """[sample]: pictures (or videos) from fixed prompts during training (training/sampling.py).
    Unset sizes, steps and guidance take the model's diffusers pipeline defaults."""

    prompts: list[Union[str, SamplePrompt]] = field(default_factory=list)
    # A text file with one prompt a line (empty lines skipped), after `prompts`.
    prompts_file: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    frames: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    # The unconditional prompt of classifier-free guidance (models that sample with it: LTX-Video).
    negative_prompt: str = ""
    # None: the top-level `seed`.
    seed: Optional[int] = None
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    at_start: bool = False

    def validate(self, file, prefix):
        for name in ("width", "height", "frames", "steps", "every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            check(value is None or value >= 1, file, key(prefix, name), f"must be at least 1, got {value}")
        check(self.guidance is None or self.guidance >= 0, file, key(prefix, "guidance"), "must be >= 0")
        for i, p in enumerate(self.prompts):
            where = f"{key(prefix, 'prompts')}[{i}]"
            text = p if isinstance(p, str) else p.prompt
            check(text.strip() != "", file, where, "is an empty prompt")
            if isinstance(p, SamplePrompt):
                for name in ("width", "height", "frames"):
                    value = getattr(p, name)
                    check(value is None or value >= 1, file, f"{where}.{name}", f"must be at least 1, got {value}")
                check(p.guidance is None or p.guidance >= 0, file, f"{where}.guidance", "must be >= 0")


@dataclass(frozen=True)
class SampleRequest:
    """One sample to draw, every setting resolved; `index` numbers it within the run's samples."""

    index: int
    prompt: str
    seed: int
    width: int
    height: int
    frames: int
    steps: int
    guidance: float
    negative_prompt: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.width, self.height, self.frames


def resolve_samples(sample: SampleConfig, model_cls, path: Path, seed: int) -> list[SampleRequest]:
    """The [sample] prompts (inline, then the prompts file) with every setting filled in: the
    prompt's own, else [sample]'s, else the model's pipeline default (`model_cls.sample_defaults`).
    Sizes and frame counts the model cannot take, and an empty prompt list, are ConfigErrors."""
    entries: list[tuple[str, SamplePrompt]] = [
        (f"sample.prompts[{i}]", p if isinstance(p, SamplePrompt) else SamplePrompt(prompt=p))
        for i, p in enumerate(sample.prompts)]
    if sample.prompts_file is not None:
        file = resolve_path(path.parent, sample.prompts_file, path, "sample.prompts_file")
        check(path_is(file, "file"), path, "sample.prompts_file", f"is not a file: {file}")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: 'sample.prompts_file' cannot be read as UTF-8 text ({e}): {file}") from None
        entries += [(f"sample.prompts_file line {n}", SamplePrompt(prompt=line.strip()))
                    for n, line in enumerate(lines, 1) if line.strip()]
    check(bool(entries), path, "sample.prompts", "lists no prompt (and prompts_file has none): give at least one")
    defaults = model_cls.sample_defaults
    base_seed = seed if sample.seed is None else sample.seed
    requests = []
    for i, (where, p) in enumerate(entries):
        def pick(name):
            own = getattr(p, name)
            shared = getattr(sample, name)
            return own if own is not None else shared if shared is not None else defaults[name]

        request = SampleRequest(index=i, prompt=p.prompt, seed=base_seed if p.seed is None else p.seed,
                                width=pick("width"), height=pick("height"), frames=pick("frames"),
                                steps=sample.steps or defaults["steps"], guidance=float(pick("guidance")),
                                negative_prompt=sample.negative_prompt)
        # The key that set the value, for the message.
        def source(name):
            return f"{where}.{name}" if getattr(p, name) is not None and where.startswith("sample.prompts[") \
                else f"sample.{name}"

        m = model_cls.size_multiple
        for name in ("width", "height"):
            value = getattr(request, name)
            check(value % m == 0, path, source(name),
                  f"= {value} is not a multiple of {m}, which model type '{model_cls.name}' needs")
        k = model_cls.frame_multiple
        if k == 0:
            check(request.frames == 1, path, source("frames"),
                  f"= {request.frames}: model type '{model_cls.name}' makes images (1 frame)")
        else:
            check((request.frames - 1) % k == 0, path, source("frames"),
                  f"= {request.frames}: model type '{model_cls.name}' takes {k}k+1 frames (1, {k + 1}, {2 * k + 1}, ...)")
        requests.append(request)
    return requests
