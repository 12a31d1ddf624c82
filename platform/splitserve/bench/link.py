"""``platform bench link``: a device on a link whose bandwidth varies, picking each frame's rate to
meet a latency deadline, against the same bundle at each fixed rate.

What is real and what is simulated. Every frame is a real val image of a data tree; each is coded
by the bundle's edge encoder at every rate (transform, gain, rounding, rANS, payload container),
and the gateway runtime answers every one of those payloads; the answers are scored by the task's
plugin. The adaptive device's choice runs the real budget search (:func:`~splitserve.evaluation.
methods.encode_within`: the transform once, :meth:`RateCoder.within` over the rates). The *link*
is simulated: it is arithmetic on those real byte counts and a bandwidth trace.

The link (:class:`Trace`) is piecewise constant, one bandwidth per slot, and carries one payload at
a time, first come first served. Frame i arrives at ``i / fps``; the device encodes it
(``encode_ms``, measured here at batch 1), sends it as soon as the link is free, and the server
answers ``server_ms`` after the last byte arrives (measured here; the server is not a queue). The
frame is **on time** when its answer exists by ``arrival + deadline``. Late frames are still sent
and answered (they delay the frames behind them), so every policy answers every frame.

Traces (reproducible: :func:`make_trace` of a name and a seed):

- ``lte-m``: an LTE-M-like link between 0.1 and 1 Mbit/s. Log-bandwidth is a Gauss–Markov (AR(1))
  process over 100 ms slots: x₀ ~ N(μ, σ²), x_{i+1} = μ + ρ (x_i − μ) + σ √(1 − ρ²) ε_i with
  μ = ln √(100 · 1000) (316 kbit/s, the bounds' geometric middle), σ = 0.6, ρ = 0.95 (about 2 s of
  memory), ε_i standard normal from ``numpy.random.default_rng(seed)``; bandwidth = e^x clipped to
  [100, 1000] kbit/s.
- ``lora``: LoRa at 125 kHz, coding rate 4/5, whose spreading factor moves as adaptive data rate
  would: SF7–SF10, bit rate SF · 125 000 / 2^SF · 4/5 (5.47, 3.13, 1.76, 0.98 kbit/s). The SF of
  each 10 s slot steps to a neighbour with probability 0.15 each way (staying at the ends); the
  first is uniform. LoRaWAN's frame-size and duty-cycle limits are left out: a payload is sent as
  one stream at the slot's rate.

Policies: **adaptive** — per frame, a byte budget = predicted bandwidth × (time from the predicted
start of its transfer to ``arrival + deadline − server_ms``), and the highest rate whose one-image
payload fits it (rate 0 when none does; it is then likely late). The predictor uses only the past,
the throughput of the device's own transfers that had finished by the frame's arrival, starting
from the trace's lowest bandwidth. ``robust`` (the default) is RobustMPC's (Yin et al., SIGCOMM
2015): the harmonic mean of the last 5 throughputs, divided by 1 + the largest relative error that
mean made on them, so a link that has just surprised the device is trusted less. ``ewma`` is an
exponentially weighted mean (α = 0.5): on both traces it overshoots after each drop and misses
about a fifth of the deadlines. The predicted start adds the bytes still queued on the radio at
arrival at the predicted bandwidth. ``oracle`` knows the trace (exact start, exact bytes the link
carries until the deadline): it checks the rule, not the predictor. **fixed** — every frame at one
rate of the bundle, or a separately trained single-rate bundle (``--fixed``).

Per policy: mean bytes, deadline misses, the task metric over all answers (late ones included),
over the on-time answers, and "in time" = the on-time answers' metric × the share of frames on
time. For top-1 "in time" is exactly the share of frames answered correctly by their deadline (a
miss counts as wrong); for other metrics it scales the on-time answers' score by that share.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LTE_M = {"low_kbit_s": 100.0, "high_kbit_s": 1000.0, "slot_ms": 100.0, "sigma": 0.6, "rho": 0.95}
LORA_SF_KBIT_S = {sf: sf * 125_000 / 2 ** sf * 4 / 5 / 1000 for sf in (7, 8, 9, 10)}
LORA = {"slot_ms": 10_000.0, "step": 0.15}
DEFAULTS = {"lte-m": {"deadline_ms": 30.0, "fps": 10.0}, "lora": {"deadline_ms": 1000.0, "fps": 0.2}}
"""Per trace: the deadline and frame rate when none is given."""
ALPHA = 0.5
"""The ewma predictor's weight of the newest throughput observation."""
WINDOW = 5
"""The robust predictor's memory: its last this many transfers' throughputs and prediction errors."""
PREDICTORS = ("robust", "ewma", "oracle")
EPS_MS = 1e-6
"""Float slack when comparing an answer's time with its deadline (the oracle's budgets are exact)."""


# -- traces ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trace:
    """A link's bandwidth: ``kbit_s[i]`` (= bits per ms) during [i · slot_ms, (i + 1) · slot_ms);
    past the last slot the last value holds."""

    name: str
    slot_ms: float
    kbit_s: tuple[float, ...]
    floor_kbit_s: float  # the lowest bandwidth the trace can take: the predictor's first guess
    description: str

    def at(self, slot: int) -> float:
        return self.kbit_s[min(slot, len(self.kbit_s) - 1)]

    def capacity_bits(self, t0: float, t1: float) -> float:
        """Bits the link carries from ``t0`` to ``t1`` (ms)."""
        bits, t = 0.0, t0
        while t < t1:
            slot = int(t // self.slot_ms)
            end = min((slot + 1) * self.slot_ms, t1)
            bits += self.at(slot) * (end - t)
            t = end
        return bits

    def finish_ms(self, t0: float, bits: float) -> float:
        """When a transfer of ``bits`` that starts at ``t0`` ends."""
        t, left = t0, float(bits)
        while True:
            slot = int(t // self.slot_ms)
            rate, end = self.at(slot), (slot + 1) * self.slot_ms
            if rate * (end - t) >= left:
                return t + left / rate
            left -= rate * (end - t)
            t = end


def lte_m_trace(seed: int, duration_ms: float) -> Trace:
    p = LTE_M
    n = max(1, math.ceil(duration_ms / p["slot_ms"]))
    eps = np.random.default_rng(seed).standard_normal(n)
    mu, sigma, rho = math.log(math.sqrt(p["low_kbit_s"] * p["high_kbit_s"])), p["sigma"], p["rho"]
    x = np.empty(n)
    x[0] = mu + sigma * eps[0]
    for i in range(1, n):
        x[i] = mu + rho * (x[i - 1] - mu) + sigma * math.sqrt(1 - rho ** 2) * eps[i]
    kbit = np.clip(np.exp(x), p["low_kbit_s"], p["high_kbit_s"])
    return Trace("lte-m", p["slot_ms"], tuple(float(v) for v in kbit), p["low_kbit_s"],
                 f"LTE-M-like, 100–1000 kbit/s: log-bandwidth Gauss–Markov over {p['slot_ms']:g} ms slots "
                 f"(geometric mean 316 kbit/s, σ {sigma:g}, ρ {rho:g}), clipped to the bounds; seed {seed}")


def lora_trace(seed: int, duration_ms: float) -> Trace:
    n = max(1, math.ceil(duration_ms / LORA["slot_ms"]))
    sfs = sorted(LORA_SF_KBIT_S)
    u = np.random.default_rng(seed).random(n)
    k = min(int(u[0] * len(sfs)), len(sfs) - 1)
    chosen = [k]
    for v in u[1:]:
        k = max(0, k - 1) if v < LORA["step"] else min(len(sfs) - 1, k + 1) if v > 1 - LORA["step"] else k
        chosen.append(k)
    rates = " / ".join(f"SF{sf} {LORA_SF_KBIT_S[sf]:.2f}" for sf in sfs)
    return Trace("lora", LORA["slot_ms"], tuple(LORA_SF_KBIT_S[sfs[k]] for k in chosen), LORA_SF_KBIT_S[sfs[-1]],
                 f"LoRa 125 kHz, CR 4/5, SF7–SF10 ({rates} kbit/s), the SF of each {LORA['slot_ms'] / 1000:g} s slot "
                 f"a step to a neighbour with probability {LORA['step']:g} each way; seed {seed}")


TRACES: dict[str, Callable[[int, float], Trace]] = {"lte-m": lte_m_trace, "lora": lora_trace}


def make_trace(name: str, seed: int, duration_ms: float) -> Trace:
    from ..errors import SplitserveError

    if name not in TRACES:
        raise SplitserveError(f"unknown trace {name!r} (known: {', '.join(TRACES)})")
    return TRACES[name](seed, duration_ms)


# -- the simulation ------------------------------------------------------------------------------
@dataclass
class Policy:
    """How a device codes its frames: ``send(frame, budget)`` → (rate index, payload bytes); the
    budget (bytes, possibly ≤ 0) is given to an adaptive policy only, None to a fixed one."""

    name: str
    encode_ms: float
    server_ms: float
    send: Callable[[int, int | None], tuple[int, int]]
    adaptive: bool = False


@dataclass
class Frame:
    index: int
    arrival_ms: float
    rate: int
    bytes: int
    budget: int | None  # the adaptive policy's byte budget
    predicted_kbit_s: float | None  # the bandwidth the budget assumed
    start_ms: float  # the transfer's first byte
    done_ms: float  # its last byte
    answer_ms: float  # done + the server's time
    deadline_ms: float  # arrival + the deadline

    @property
    def on_time(self) -> bool:
        return self.answer_ms <= self.deadline_ms + EPS_MS


def simulate(trace: Trace, arrivals_ms: Sequence[float], deadline_ms: float, policy: Policy,
             predictor: str = "robust") -> list[Frame]:
    """Send every frame of ``policy`` over ``trace`` (see the module docstring for the rules)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    frames: list[Frame] = []
    estimate, observed, link_free = trace.floor_kbit_s, 0, 0.0
    seen: list[float] = []  # the throughput of each transfer observed so far, in order
    guesses: list[float] = []  # each frame's guess before any discount (robust: the harmonic mean)
    errors: list[float] = []  # each observed transfer's relative error against its guess
    for i, t in enumerate(arrivals_ms):
        ready, last = t + policy.encode_ms, t + deadline_ms - policy.server_ms  # the last byte's latest time
        budget = predicted = None
        if policy.adaptive and predictor == "oracle":
            start = max(ready, link_free)
            budget = math.floor(trace.capacity_bits(start, last) / 8 + 1e-9) if last > start else 0
            predicted = trace.at(int(start // trace.slot_ms))
        elif policy.adaptive:
            while observed < len(frames) and frames[observed].done_ms <= t:  # only transfers done by now
                f = frames[observed]
                seen.append(8 * f.bytes / (f.done_ms - f.start_ms))
                estimate = ALPHA * seen[-1] + (1 - ALPHA) * estimate
                errors.append(abs(guesses[observed] - seen[-1]) / seen[-1])
                observed += 1
            predicted = estimate
            if predictor == "robust":
                recent = seen[-WINDOW:]
                guesses.append(len(recent) / sum(1 / x for x in recent) if recent else trace.floor_kbit_s)
                predicted = guesses[-1] / (1 + max(errors[-WINDOW:], default=0.0))
            else:
                guesses.append(estimate)
            queued = sum(8 * f.bytes - trace.capacity_bits(f.start_ms, t) if f.start_ms < t else 8 * f.bytes
                         for f in frames[observed:] if f.done_ms > t)  # what the radio has not sent yet
            start = max(ready, t + queued / predicted)
            budget = math.floor(predicted * (last - start) / 8)
        rate, nbytes = policy.send(i, budget)
        start = max(ready, link_free)
        done = trace.finish_ms(start, 8 * nbytes)
        link_free = done
        frames.append(Frame(i, t, rate, nbytes, budget, predicted, start, done, done + policy.server_ms,
                            t + deadline_ms))
    return frames


def account(frames: Sequence[Frame], answers: Sequence[Any], score: Callable[[list[int], list[Any]], float]
            ) -> dict[str, Any]:
    """A policy's figures: ``answers[i]`` is frame i's answer, ``score(frames, answers)`` the task
    metric of those frames' answers."""
    on = [f for f in frames if f.on_time]
    n = len(frames)
    on_time = score([f.index for f in on], [answers[f.index] for f in on]) if on else None
    return {
        "frames": n,
        "mean_bytes": statistics.mean(f.bytes for f in frames),
        "misses": n - len(on),
        "miss_rate": (n - len(on)) / n,
        "metric_all": score([f.index for f in frames], [answers[f.index] for f in frames]),
        "metric_on_time": on_time,
        "metric_in_time": (on_time or 0.0) * len(on) / n,
        "rates": dict(sorted(Counter(f.rate for f in frames).items())),
    }


# -- the benchmark -------------------------------------------------------------------------------
class Coded:
    """Every frame coded by one bundle at each of its rates, the gateway runtime's answers to those
    payloads, and the bundle's timings on this machine. Keyed by rate index (0 for a single-rate
    bundle)."""

    def __init__(self, point, task: str, items: Sequence, batch_size: int = 32, repeat: int = 20):
        from ..evaluation.methods import encode_at
        from .timing import median_ms

        self.point, self.name = point, point.path.name
        edge = point.edge
        self.inputs = [edge.preprocess([item.path]) for item in items]
        self.rates = list(range(point.rates))
        self.payloads = {k: [encode_at(edge, x, s, self.rate_arg(k)).data for x, s in self.inputs] for k in self.rates}
        self.answers = {k: [a for i in range(0, len(items), batch_size)
                            for a in point.answer(task, self.payloads[k][i:i + batch_size])] for k in self.rates}
        x, s = self.inputs[0]
        self.encode_ms = {k: median_ms(lambda k=k: encode_at(edge, x, s, self.rate_arg(k)), repeat) for k in self.rates}
        self.server_ms = median_ms(lambda: point.answer(task, [self.payloads[point.rate or 0][0]]), repeat)

    def rate_arg(self, k: int) -> int | None:
        """What :func:`encode_at` takes for rate ``k`` (None: a single-rate bundle's one rate)."""
        return None if self.point.rates == 1 else k

    def label(self, k: int) -> str:
        return self.name if self.point.rates == 1 else f"{self.name} r{k}"

    def fixed(self, k: int) -> Policy:
        return Policy(f"fixed {self.label(k)}", self.encode_ms[k], self.server_ms,
                      lambda i, budget: (k, len(self.payloads[k][i])))

    def adaptive(self, repeat: int = 20) -> Policy:
        """Each frame at the highest rate that fits its budget, by the real budget search."""
        from splitserve_edge.rates import BudgetError

        from ..errors import SplitserveError
        from ..evaluation.methods import encode_within
        from .timing import median_ms

        edge = self.point.edge

        def search(i: int, budget: int) -> tuple[int, int]:
            x, s = self.inputs[i]
            if budget < 1:  # the deadline is spent before the first byte could go: no payload fits
                return 0, len(self.payloads[0][i])
            try:
                encoded = encode_within(edge, x, s, budget)
            except BudgetError:  # not even rate 0 fits: send rate 0 anyway (it is likely late)
                return 0, len(self.payloads[0][i])
            rate = encoded.payload.image_rates[0]
            if encoded.data != self.payloads[rate][i]:  # so the fixed-rate answers are this payload's
                raise SplitserveError(f"{self.name}: the budget search's rate-{rate} payload differs from the "
                                      "fixed-rate one")
            return rate, len(encoded.data)

        x, s = self.inputs[0]
        budget = int(statistics.median(len(p) for p in self.payloads[self.rates[len(self.rates) // 2]]))
        encode_ms = median_ms(lambda: search(0, budget), repeat)  # the transform once + the search
        return Policy(f"adaptive {self.name}", encode_ms, self.server_ms, search, adaptive=True)


def run(bundle: Path, data: Path, *, fixed: Sequence[Path] = (), task: str | None = None, trace: str = "lte-m",
        deadline_ms: float | None = None, fps: float | None = None, frames: int = 100, seed: int = 0,
        split: str = "val", predictor: str = "robust", plot: Path | None = None, repeat: int = 20,
        encode_ms: float | None = None, server_ms: float | None = None, report_dir: Path | None = None) -> str:
    """Code ``frames`` val images with ``bundle`` (and the ``fixed`` bundles), simulate every policy
    on the trace, and return the report's Markdown (the plot goes to ``plot``). ``encode_ms`` and
    ``server_ms``, when given, replace the times measured here for every policy (a device's own
    encode time, say, or fixed figures that make the run repeatable on a busy machine). The report
    links the plot relative to ``report_dir``, the directory of the Markdown file it goes into."""
    from ..bundle import read_manifest
    from ..errors import SplitserveError
    from ..evaluation.methods import BundlePoint
    from ..evaluation.tasks import load_task_data
    from ..plugins import PluginRegistry
    from .report import machine

    if trace not in TRACES:
        raise SplitserveError(f"unknown trace {trace!r} (known: {', '.join(TRACES)})")
    deadline_ms = DEFAULTS[trace]["deadline_ms"] if deadline_ms is None else float(deadline_ms)
    fps = DEFAULTS[trace]["fps"] if fps is None else float(fps)
    if frames < 1 or deadline_ms <= 0 or fps <= 0:
        raise SplitserveError("--frames, --deadline-ms and --fps must be positive")
    registry = PluginRegistry.discover()
    manifest = read_manifest(bundle)
    task = registry.get(task).name if task else ("classification" if "classification" in manifest.tasks
                                                 else next(iter(manifest.tasks), ""))
    data_set = load_task_data(registry.get(task), data, split, manifest.policy, frames)
    if len(data_set.items) < frames:
        raise SplitserveError(f"{data}: {len(data_set.items)} {split} images for {task}, fewer than --frames {frames}")
    items = data_set.items
    coded = []
    for path in (bundle, *fixed):
        point = BundlePoint(path, [task], registry)
        if task not in point.tasks:
            raise SplitserveError(f"{path}: no head for {task}")
        coded.append(Coded(point, task, items, repeat=repeat))
    main = coded[0]
    policies = [(main.adaptive(repeat), main)] + [(c.fixed(k), c) for c in coded for k in c.rates]
    for policy, _ in policies:
        policy.encode_ms = policy.encode_ms if encode_ms is None else float(encode_ms)
        policy.server_ms = policy.server_ms if server_ms is None else float(server_ms)

    arrivals = [i * 1000.0 / fps for i in range(frames)]
    link = make_trace(trace, seed, arrivals[-1] + 10 * deadline_ms + 60_000)
    rows = []
    for policy, c in policies:
        sent = simulate(link, arrivals, deadline_ms, policy, predictor)
        figures = account(sent, [c.answers[f.rate][f.index] for f in sent], frame_scorer(data_set, c.point.config(task)))
        rows.append((policy, c, sent, figures))
    if plot is not None:
        plot_link(link, rows[0][2], Path(plot), deadline_ms, rows[0][0].name, main.point.rates)
    given = [f"{name} {v:g} ms" for name, v in (("encode", encode_ms), ("server", server_ms)) if v is not None]
    shown = None if plot is None else Path(os.path.relpath(plot, report_dir)) if report_dir is not None else Path(plot)
    return _markdown(link, main, coded[1:], data_set, split, rows, deadline_ms, fps, predictor, machine(), shown, given)


def frame_scorer(data, config) -> Callable[[list[int], list[Any]], float]:
    """``score(frames, answers)``: the task metric of the answers to those frames (frame i shows
    ``data.items[i]``), by the plugin's own scorer."""
    def score(indices: list[int], answers: list[Any]) -> float:
        scorer = data.plugin.make_scorer(data.dataset, config)
        scorer.update(answers, [data.items[i].target for i in indices])
        return scorer.result()[data.metric]
    return score


PREDICTION = {
    "oracle": "the prediction is the trace itself (oracle).",
    "ewma": f"the prediction is an exponentially weighted mean (α = {ALPHA:g}) of the throughput of its own "
            "transfers finished by the frame's arrival, starting from the trace's lowest bandwidth.",
    "robust": f"the prediction is the harmonic mean of the throughput of its last {WINDOW} transfers finished by "
              f"the frame's arrival, divided by 1 + the largest relative error of that mean over those {WINDOW} "
              "(RobustMPC, Yin et al., SIGCOMM 2015), starting from the trace's lowest bandwidth.",
}
"""How the report states each predictor."""


def _times(given: Sequence[str]) -> str:
    """Where the report's encode and server times come from: given (the same for every policy) or measured."""
    how = "here at batch 1 (encode: the model input to payload bytes; the adaptive device's includes its budget search)"
    if len(given) == 2:
        return f"Times given, the same for every policy: {', '.join(given)}."
    if given:
        return f"{given[0].capitalize()} given for every policy; the other time is a median measured {how}."
    return f"Encode and server times are medians measured {how}."


def _markdown(link: Trace, main: Coded, others: Sequence[Coded], data_set, split: str, rows, deadline_ms: float,
              fps: float, predictor: str, where: str, plot, given: Sequence[str] = ()) -> str:
    metric, manifest = data_set.label, main.point.manifest
    trained = f"; separately trained: {', '.join(f'`{c.name}`' for c in others)}" if others else ""
    L = [f"### {link.name}: a rate per frame (`platform bench link --trace {link.name}`)", "",
         f"Machine: {where}.",
         f"Bundle: `{main.name}` ({manifest.codec.family}, {main.point.rates} rate(s), preprocessing "
         f"{manifest.policy.describe()}){trained}.",
         f"Frames: {len(rows[0][2])} {split} images of `{data_set.root}` ({data_set.task}), one every {1000 / fps:g} ms; "
         f"deadline {deadline_ms:g} ms from a frame's arrival to its answer.",
         f"Trace: {link.description}.", "",
         "Every frame is a real image coded by the bundle's edge encoder into a real payload (entropy-coded bytes "
         "in their container) at every rate, answered by the gateway runtime and scored by the task's plugin. "
         "The link is simulated: arithmetic on those byte counts over the trace (one payload at a time, first come "
         "first served; late frames are still sent). "
         + _times(given)
         + " The adaptive device's byte budget is the predicted bandwidth × the time left for its transfer; "
         + PREDICTION[predictor] + " "
         + "\"In time\" counts a missed frame as a failure (the on-time answers' score × the share on time).", "",
         f"| policy | rates sent | mean bytes | encode ms | server ms | deadline misses | {metric}, all answers | "
         f"{metric}, on-time answers | {metric} in time |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for policy, c, _, a in rows:
        rates = ", ".join(f"r{r}: {n}" for r, n in a["rates"].items()) if c.point.rates > 1 else "—"
        on_time = "—" if a["metric_on_time"] is None else f"{a['metric_on_time']:.2f}"
        L.append(f"| {policy.name} | {rates} | {a['mean_bytes']:.1f} | {policy.encode_ms:.2f} | {policy.server_ms:.2f} "
                 f"| {a['misses']} ({100 * a['miss_rate']:.1f} %) | {a['metric_all']:.2f} | {on_time} | "
                 f"{a['metric_in_time']:.2f} |")
    if plot is not None:
        L += ["", f"![the trace and the adaptive device's rate per frame]({plot.as_posix()})"]
    return "\n".join(L)


def plot_link(link: Trace, frames: Sequence[Frame], out: Path, deadline_ms: float, title: str, rates: int) -> Path:
    """The trace (and the bandwidth each budget assumed), then the rate chosen per frame, misses marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    end = max(f.answer_ms for f in frames) + deadline_ms
    slots = min(len(link.kbit_s), int(end // link.slot_ms) + 1)
    t = np.arange(slots + 1) * link.slot_ms / 1000
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5.2), sharex=True, height_ratios=[3, 2])
    top.stairs([link.at(i) for i in range(slots)], t, baseline=None, color="tab:blue", label="link bandwidth (trace)")
    predicted = [(f.arrival_ms / 1000, f.predicted_kbit_s) for f in frames if f.predicted_kbit_s is not None]
    if predicted:
        top.plot(*zip(*predicted), "o", ms=3, color="tab:orange", label="bandwidth the budget assumed")
    top.set_yscale("log")
    top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    top.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    top.set_ylabel("kbit/s (log scale)")
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the trace fills the plot
    top.grid(alpha=0.3, which="both")
    ok = [f for f in frames if f.on_time]
    late = [f for f in frames if not f.on_time]
    bottom.plot([f.arrival_ms / 1000 for f in ok], [f.rate for f in ok], "o", ms=4, color="tab:green", label="on time")
    bottom.plot([f.arrival_ms / 1000 for f in late], [f.rate for f in late], "x", ms=6, color="tab:red",
                label="missed the deadline")
    bottom.set_ylabel("rate index sent")
    bottom.set_xlabel("time (s)")
    bottom.set_yticks(range(rates))
    bottom.set_ylim(-0.5, rates - 0.5)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    bottom.grid(alpha=0.3)
    fig.suptitle(f"{title}: {link.name} trace, deadline {deadline_ms:g} ms", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
