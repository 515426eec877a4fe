"""`veil eval privacy`: utility and inversion risk of each sanitizer at several epsilons, in one run.

Every figure is measured here on this machine; sanitizer randomness is seeded per (mechanism, epsilon),
so a rerun reproduces the table.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from veil.eval import data
from veil.eval.attack import KnnInverter
from veil.eval.baselines import corpus_counts
from veil.eval.mechanisms import MECHANISMS, Context, MechanismSpec, PromptSanitizer
from veil.eval.utility import ZeroShot, probe_accuracy
from veil.privacy.encoder import SentenceEncoder
from veil.privacy.neighbours import tqdm_progress
from veil.privacy.vocabulary import Vocabulary


@dataclass(frozen=True)
class Settings:
    num_train: int  # sanitized training sentences for the probe (utility B)
    num_test: int  # sanitized test sentences for the probe and the inversion attack
    num_zero_shot: int  # of those, how many the bundled model classifies (utility A)
    num_calibration: int  # clean training sentences that set the zero-shot threshold
    epsilons: tuple[float, ...] = (1.0, 2.0, 3.0, 6.0)
    seed: int = 0
    cost_repeats: int = 20  # timed sanitizer calls for the cost figure (0: not measured)


QUICK = Settings(num_train=80, num_test=40, num_zero_shot=40, num_calibration=32, cost_repeats=5)
FULL = Settings(num_train=600, num_test=300, num_zero_shot=300, num_calibration=128)


@dataclass
class Row:
    mechanism: str
    epsilon: float | None  # None: no sanitizing
    zero_shot_accuracy: float
    probe_accuracy: float
    knn_top1: float  # share of sanitized units whose original is the nearest neighbour of what was sent
    knn_top10: float
    changed: float  # share of all test tokens replaced by something else
    sanitized: float  # share of all test tokens run through the mechanism
    exposed_top1: float  # share of all test tokens sent in clear or recovered at top-1
    epsilon_per_sentence: float  # mean total epsilon charged per test sentence
    seconds: float  # wall time of the row (build, sanitize, both utilities, attack)
    zero_shot_stderr: float = 0.0  # binomial standard error, sqrt(a (1 - a) / n)
    probe_stderr: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of this process for the row, all threads (0: not recorded)


@dataclass
class Report:
    settings: Settings
    rows: list[Row] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)
    mechanisms: dict[str, str] = field(default_factory=dict)
    num_sentences: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "rows": [asdict(r) for r in self.rows],
            "cost": self.cost,
            "mechanisms": self.mechanisms,
            "num_sentences": self.num_sentences,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Report:
        """The inverse of `to_json` (to resume an interrupted run)."""
        settings = obj["settings"]
        return cls(
            Settings(**(settings | {"epsilons": tuple(settings["epsilons"])})),
            [Row(**row) for row in obj["rows"]],
            dict(obj.get("cost", {})),
            dict(obj.get("mechanisms", {})),
            dict(obj.get("num_sentences", {})),
        )

    def has_row(self, mechanism: str, epsilon: float | None) -> bool:
        return any(r.mechanism == mechanism and r.epsilon == epsilon for r in self.rows)


def say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[eval] {message}", file=sys.stderr)  # above any progress bar, not through it


class Experiment:
    """Holds the model, the data and the two utility measures; `run` fills a `Report`."""

    def __init__(self, loaded: Any, settings: Settings, *, resume: Report | None = None) -> None:
        """`resume`: a partial report of the same settings; its rows are kept and not measured again."""
        if resume is not None and _comparable(resume.settings) != _comparable(settings):
            raise ValueError(f"cannot resume a run of {resume.settings} with {settings}")
        self.settings = settings
        self.loaded = loaded
        tokenizer = loaded.tokenizer
        examples = data.movie_reviews()
        split = data.split(examples, seed=settings.seed)
        self.train = split.train[: settings.num_train]
        self.test = split.test[-settings.num_test :]  # held out: development used the first sentences
        encode: Callable[[str], list[int]] = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        self.train_ids = [encode(e.text) for e in self.train]
        self.test_ids = [encode(e.text) for e in self.test]
        embeddings = loaded.model.embed_tokens.weight.detach().float().numpy()
        vocabulary = Vocabulary.from_tokenizer(tokenizer, size=embeddings.shape[0])
        counts = corpus_counts(encode(e.text) for e in examples)
        self.features = SentenceEncoder(data.minilm_directory())
        all_ids = self.train_ids + self.test_ids
        run_tokens = np.unique(np.fromiter((t for ids in all_ids for t in ids), dtype=np.int64))
        self.context = Context(
            embeddings, vocabulary, counts, self.features, progress=tqdm_progress(), run_tokens=run_tokens
        )
        self.inverter = KnnInverter(embeddings)
        self.zero_shot = ZeroShot.for_model(loaded)
        self._feature_memo: dict[str, np.ndarray] = {}  # probe features per sentence text, for the run
        self.report = Report(
            settings, num_sentences={"all": len(examples), "train": len(self.train), "test": len(self.test)}
        )
        if resume is not None:
            self.report.rows = list(resume.rows)
            self.report.mechanisms = dict(resume.mechanisms)

    def run(
        self,
        mechanisms: Sequence[MechanismSpec] = MECHANISMS,
        on_row: Callable[[Report], None] | None = None,
    ) -> Report:
        """Measure every mechanism at every epsilon; `on_row(report)` after each row (partial results)."""
        from tqdm import tqdm

        say(f"calibrating the zero-shot threshold on {self.settings.num_calibration} clean sentences")
        self.zero_shot.calibrate(self.train_ids[: self.settings.num_calibration])
        self.report.mechanisms.update((spec.name, spec.description) for spec in mechanisms)
        todo = [  # every mechanism at the first epsilon first
            (spec, epsilon)
            for epsilon in self.settings.epsilons
            for spec in mechanisms
            if not self.report.has_row(spec.name, epsilon)
        ]
        clean = not self.report.has_row("none", None)
        with tqdm(total=len(todo) + clean, desc="rows", unit="row") as rows:
            if clean:
                self.report.rows.append(self._measure("none", None, None))
                rows.update()
            say("encoding the data set's words for the word space, in batches")
            vocabulary = self.context.vocabulary
            self.context.words().warm(
                [w.text for ids in self.train_ids + self.test_ids for w in vocabulary.segment(ids).words]
            )
            for spec, epsilon in todo:
                rows.set_postfix_str(f"{spec.name} eps={epsilon:g}")
                seed = [self.settings.seed, zlib.crc32(spec.name.encode()), int(epsilon * 1000)]
                started = time.monotonic()
                sanitizer = spec.build(self.context, epsilon, np.random.default_rng(seed))
                self.report.rows.append(self._measure(spec.name, epsilon, sanitizer, started))
                rows.update()
                if on_row is not None:
                    on_row(self.report)
        if self.settings.cost_repeats:
            self.report.cost = self.measure_cost(repeats=self.settings.cost_repeats)
        return self.report

    def _measure(
        self,
        name: str,
        epsilon: float | None,
        sanitizer: PromptSanitizer | None,
        started: float | None = None,
    ) -> Row:
        started = started if started is not None else time.monotonic()
        cpu_started = time.process_time()
        label = name if epsilon is None else f"{name} eps={epsilon:g}"
        if sanitizer is None:
            train_out, test_out = self.train_ids, self.test_ids
            stats = {
                "knn_top1": 1.0,
                "knn_top10": 1.0,
                "changed": 0.0,
                "sanitized": 0.0,
                "exposed_top1": 1.0,
                "epsilon_per_sentence": 0.0,
            }
        else:
            train_out = [list(sanitizer.sanitize(ids).token_ids) for ids in self.train_ids]
            results = [sanitizer.sanitize(ids) for ids in self.test_ids]
            test_out = [list(r.token_ids) for r in results]
            stats = self._privacy(results)
        zero_shot = self._zero_shot(test_out, label)
        say(f"{label}: probe on {len(train_out)}+{len(test_out)} sentences")
        probe = self._probe(train_out, test_out)
        row = Row(
            name,
            epsilon,
            zero_shot,
            probe,
            seconds=time.monotonic() - started,
            zero_shot_stderr=_stderr(zero_shot, self.settings.num_zero_shot),
            probe_stderr=_stderr(probe, len(test_out)),
            cpu_seconds=time.process_time() - cpu_started,
            **stats,
        )
        say(
            f"{label}: zero-shot {zero_shot:.3f} probe {probe:.3f} top1 {row.knn_top1:.3f} "
            f"top10 {row.knn_top10:.3f} changed {row.changed:.3f} "
            f"({row.seconds:.0f} s, {row.cpu_seconds:.0f} s CPU)"
        )
        return row

    def _privacy(self, results: list[Any]) -> dict[str, float]:
        received: list[int] = []
        sources: list[list[int]] = []
        total = sum(len(ids) for ids in self.test_ids)
        changed = 0
        for result in results:
            units = [list(o) for o in result.originals]
            sent = [result.token_ids[p] for p in result.replaced_positions]
            received += sent
            sources += units
            changed += sum(len(u) for u, s in zip(units, sent) if u != [s])
        attack = self.inverter.attack(received, sources)
        sanitized = sum(len(u) for u in sources)
        recovered = (
            sum(
                len(u)
                for u, s in zip(sources, self.inverter.neighbours(np.asarray(received))[:, 0])
                if s in u
            )
            if received
            else 0
        )
        return {
            "knn_top1": attack.top1,
            "knn_top10": attack.top10,
            "changed": changed / total,
            "sanitized": sanitized / total,
            "exposed_top1": (total - sanitized + recovered) / total,
            "epsilon_per_sentence": float(np.mean([r.epsilon_spent for r in results])),
        }

    def _zero_shot(self, test_out: list[list[int]], label: str) -> float:
        from tqdm import tqdm

        count = self.settings.num_zero_shot
        labels = np.array([e.label for e in self.test[:count]])
        with tqdm(total=count, desc=f"{label}: zero-shot", unit="sentence", leave=False) as bar:

            def progress(done: int, total: int) -> None:  # `total`: sentences not scored before
                bar.total, bar.n = total, done
                bar.refresh()

            scores = self.zero_shot.scores(test_out[:count], progress)
        return self.zero_shot.accuracy(scores, labels)

    def _probe(self, train_out: list[list[int]], test_out: list[list[int]]) -> float:
        train_x = self._features_of(train_out)
        test_x = self._features_of(test_out)
        return probe_accuracy(
            train_x, np.array([e.label for e in self.train]), test_x, np.array([e.label for e in self.test])
        )

    def _features_of(self, sentences: list[list[int]]) -> np.ndarray:
        """Probe features of token sequences, encoding only texts not seen before in this run (the encoder
        is frozen: a text's features do not depend on the row)."""
        texts = [self.loaded.tokenizer.decode(ids) for ids in sentences]
        new = list(dict.fromkeys(t for t in texts if t not in self._feature_memo))
        if new:
            self._feature_memo.update(zip(new, self.features.encode(new)))
        return np.stack([self._feature_memo[t] for t in texts])

    def measure_cost(self, *, num_tokens: int = 128, repeats: int = 20) -> dict[str, float]:
        """Median time for veil-words to sanitize a `num_tokens` prompt (warm tables; words outside the
        list are encoded on every call) vs one forward pass over it."""
        prompt = [t for ids in self.test_ids for t in ids][:num_tokens]
        sanitizer = self.context.veil(epsilon=1.0, rng=np.random.default_rng(0), words=True)
        sanitizer.sanitize(prompt)  # warm-up
        sanitize_s = _median_seconds(lambda: sanitizer.sanitize(prompt), repeats)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            self.loaded.model(ids)  # warm-up
            forward_s = _median_seconds(lambda: self.loaded.model(ids), max(1, repeats // 4))
        say(
            f"cost: sanitize {sanitize_s * 1e3:.2f} ms, forward {forward_s * 1e3:.1f} ms "
            f"({100 * sanitize_s / forward_s:.2f}%) for {len(prompt)} tokens"
        )
        return {
            "num_tokens": float(len(prompt)),
            "sanitize_ms": sanitize_s * 1e3,
            "forward_ms": forward_s * 1e3,
            "ratio_percent": 100 * sanitize_s / forward_s,
            "torch_threads": float(torch.get_num_threads()),
        }


def _comparable(settings: Settings) -> Settings:
    """What two runs must share for their rows to sit in one table (epsilons and cost may differ)."""
    return replace(settings, epsilons=(), cost_repeats=0)


def _stderr(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))
