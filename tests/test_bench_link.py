"""`platform bench link`: reproducible traces inside their stated bounds, the simulation's timing and
scoring against a hand computation, and the adaptive device never over its byte budget when it
knows the link (real payloads of a 4-rate bundle)."""

from __future__ import annotations

import pytest

from splitserve.bench.link import (LORA_SF_KBIT_S, Frame, Policy, Trace, account, frame_scorer, make_trace,
                                   simulate)

from .conftest import texture


def test_traces_are_reproducible_per_seed_and_inside_their_bounds():
    ten_minutes = 600_000.0
    lte = make_trace("lte-m", 0, ten_minutes)
    assert lte.kbit_s == make_trace("lte-m", 0, ten_minutes).kbit_s
    assert lte.kbit_s != make_trace("lte-m", 1, ten_minutes).kbit_s
    assert make_trace("lte-m", 0, ten_minutes / 2).kbit_s == lte.kbit_s[:3000]  # a longer run extends, not reshuffles
    assert len(lte.kbit_s) == 6000 and lte.slot_ms == 100.0
    assert min(lte.kbit_s) == 100.0 and max(lte.kbit_s) == 1000.0  # reaches both bounds, never beyond
    assert 200 < float(sum(lte.kbit_s)) / len(lte.kbit_s) < 500  # around the geometric middle, 316
    lora = make_trace("lora", 3, ten_minutes)
    assert lora.kbit_s == make_trace("lora", 3, ten_minutes).kbit_s != make_trace("lora", 4, ten_minutes).kbit_s
    ladder = sorted(LORA_SF_KBIT_S.values())
    assert LORA_SF_KBIT_S[7] == pytest.approx(5.46875) and LORA_SF_KBIT_S[10] == pytest.approx(0.9765625)
    assert set(lora.kbit_s) <= set(ladder) and lora.floor_kbit_s == ladder[0]
    steps = {abs(ladder.index(a) - ladder.index(b)) for a, b in zip(lora.kbit_s, lora.kbit_s[1:])}
    assert steps <= {0, 1}  # one spreading factor at a time


def test_link_arithmetic():
    trace = Trace("steps", 10.0, (8.0, 16.0, 4.0), 4.0, "")
    assert trace.capacity_bits(5.0, 25.0) == 8 * 5 + 16 * 10 + 4 * 5
    assert trace.finish_ms(5.0, 8 * 5 + 16 * 10 + 4 * 5) == pytest.approx(25.0)
    assert trace.finish_ms(25.0, 40.0) == pytest.approx(35.0)  # past the last slot the last value holds


def _scored(tmp_path, targets):
    from splitserve.evaluation.tasks import TaskData
    from splitserve.plugins import EvalSample, PluginRegistry

    plugin = PluginRegistry.discover().get("classification")
    data = TaskData(plugin, tmp_path, None, [EvalSample(tmp_path / f"{i}.png", t) for i, t in enumerate(targets)])
    return frame_scorer(data, {})


def _answer(index: int):
    from splitserve_tasks.classification.schema import ClassificationResult, ClassScore

    return ClassificationResult(top=[ClassScore(index=index, label="x", probability=1.0)])


def test_a_tiny_run_against_a_hand_computation(tmp_path):
    """A link of 8 kbit/s = 1 byte per ms; frames every 100 ms, encode 10 ms, server 5 ms, deadline 60 ms.

    Fixed policy, payloads 30, 50, 120, 40 bytes: frame 0 is sent 10–40 and answered at 45 (on time);
    frame 1 110–160, answered 165 > 160 (late); frame 2 210–330 (late); frame 3 is ready at 310 but
    waits for the link until 330, 330–370, answered 375 > 360 (late, behind frame 2)."""
    trace = Trace("constant", 1000.0, (8.0,), 4.0, "8 kbit/s")
    sizes = [30, 50, 120, 40]
    fixed = Policy("fixed", 10.0, 5.0, lambda i, budget: (0, sizes[i]))
    frames = simulate(trace, [0.0, 100.0, 200.0, 300.0], 60.0, fixed)
    assert [(f.start_ms, f.done_ms, f.answer_ms) for f in frames] == [
        (10.0, 40.0, 45.0), (110.0, 160.0, 165.0), (210.0, 330.0, 335.0), (330.0, 370.0, 375.0)]
    assert [f.on_time for f in frames] == [True, False, False, False]
    assert all(f.budget is None for f in frames)
    # targets 3, 1, 4, 1; answers right, right, wrong, right
    score = _scored(tmp_path, [3, 1, 4, 1])
    got = account(frames, [_answer(3), _answer(1), _answer(9), _answer(1)], score)
    assert got == {"frames": 4, "mean_bytes": 60, "misses": 3, "miss_rate": 0.75, "metric_all": 75.0,
                   "metric_on_time": 100.0, "metric_in_time": 25.0, "rates": {0: 4}}


def _search(cost):
    """The budget search over rates costing ``cost`` bytes: the highest that fits, else rate 0."""
    def search(i, budget):
        fits = [k for k, c in enumerate(cost) if c <= budget]
        return (fits[-1], cost[fits[-1]]) if fits else (0, cost[0])
    return search


def test_the_ewma_budget_uses_only_the_past(tmp_path):
    """The same link; rates cost 20, 40, 80 bytes; the predictor starts at the floor, 4 bits/ms.

    frame 0 (t 0): budget ⌊4 · (55 − 10) / 8⌋ = 22 → rate 0, sent 10–30 (8 bits/ms observed);
    frame 1 (t 100): estimate ½·8 + ½·4 = 6, ⌊6 · 45 / 8⌋ = 33 → rate 0, 110–130;
    frame 2 (t 200): 7, ⌊7 · 45 / 8⌋ = 39 → rate 0, 210–230;
    frame 3 (t 300): 7.5, ⌊7.5 · 45 / 8⌋ = 42 → rate 1, 310–350;
    frame 4 (t 340): frame 3 is still on the air (not observed: 7.5 holds) with 320 − 240 = 80 bits
    left, so its start is predicted at 340 + 80 / 7.5; ⌊7.5 · (395 − 350.67) / 8⌋ = 41 → rate 1,
    350–390, answered 395 ≤ 400."""
    trace = Trace("constant", 1000.0, (8.0,), 4.0, "8 kbit/s")
    adaptive = Policy("adaptive", 10.0, 5.0, _search([20, 40, 80]), adaptive=True)
    frames = simulate(trace, [0.0, 100.0, 200.0, 300.0, 340.0], 60.0, adaptive, predictor="ewma")
    assert [f.budget for f in frames] == [22, 33, 39, 42, 41]
    assert [f.predicted_kbit_s for f in frames] == [4.0, 6.0, 7.0, 7.5, 7.5]
    assert [f.rate for f in frames] == [0, 0, 0, 1, 1]
    assert [(f.start_ms, f.done_ms) for f in frames][-2:] == [(310.0, 350.0), (350.0, 390.0)]
    assert all(f.on_time for f in frames)
    score = _scored(tmp_path, [0] * 5)
    got = account(frames, [_answer(0)] * 4 + [_answer(2)], score)
    assert (got["metric_all"], got["metric_in_time"], got["mean_bytes"], got["rates"]) == (80.0, 80.0, 28, {0: 3, 1: 2})


def test_the_robust_budget_distrusts_a_link_that_surprised_it():
    """Rates cost 20, 40, 80 bytes; encode 10 ms, server 5, deadline 70: 55 ms to send.

    Steady 8 bits/ms, first guess the floor, 4: frame 0 budget ⌊4 · 55 / 8⌋ = 27 → rate 0. Seen
    [8]: the guess was off by |4 − 8| / 8 = ½, so the next five frames assume 8 / 1.5 = 5.33
    (budget 36, rate 0) although every transfer since ran at 8; once that error leaves the last
    five, frame 6 assumes 8 (budget 55) → rate 1. An EWMA would send rate 1 from frame 2."""
    adaptive = Policy("adaptive", 10.0, 5.0, _search([20, 40, 80]), adaptive=True)
    steady = Trace("constant", 1000.0, (8.0,), 4.0, "8 kbit/s")
    frames = simulate(steady, [100.0 * i for i in range(7)], 70.0, adaptive)
    assert [f.budget for f in frames] == [27, 36, 36, 36, 36, 36, 55]
    assert [f.rate for f in frames] == [0] * 6 + [1]
    assert [f.rate for f in simulate(steady, [100.0 * i for i in range(7)], 70.0, adaptive, predictor="ewma")][2] == 1
    # 8 then 2 bits/ms by 100 ms slots: seen [8, 2], harmonic mean 2 / (1/8 + 1/2) = 3.2 (arithmetic: 5);
    # frame 1's guess 8 was off by |8 − 2| / 2 = 3, so frame 2 assumes 3.2 / 4 = 0.8, budget 5: rate 0
    swinging = Trace("swinging", 100.0, (8.0, 2.0, 8.0), 4.0, "8 / 2 kbit/s")
    frames = simulate(swinging, [0.0, 100.0, 200.0], 70.0, adaptive)
    assert [f.predicted_kbit_s for f in frames] == pytest.approx([4.0, 8 / 1.5, 0.8])
    assert [f.budget for f in frames] == [27, 36, 5]


@pytest.fixture(scope="module")
def coded(vr_bundle_dir, tmp_path_factory):
    """Real photos coded by the 4-rate bundle at every rate, with the gateway runtime's answers."""
    from splitserve.bench.link import Coded
    from splitserve.evaluation.methods import BundlePoint
    from splitserve.plugins import EvalSample, PluginRegistry

    root = tmp_path_factory.mktemp("frames")
    items = []
    for i, name in enumerate(["brick", "grass", "gravel", "coffee", "astronaut", "chelsea", "rocket", "camera"]):
        path = root / f"{name}.png"
        texture(name, (90 + 7 * i, 70)).save(path)
        items.append(EvalSample(path, i % 10))
    point = BundlePoint(vr_bundle_dir, ["classification"], PluginRegistry.discover())
    return Coded(point, "classification", items, repeat=1)


def test_the_budget_search_sends_the_largest_payload_that_fits(coded):
    """At each rate's exact size, one byte less and one more, the search returns the highest rate
    whose whole payload fits: never a byte over."""
    from splitserve_edge.rates import BudgetError

    from splitserve.evaluation.methods import encode_within

    for i, (x, sizes) in enumerate(coded.inputs[:3]):
        lengths = [len(coded.payloads[k][i]) for k in coded.rates]
        for budget in sorted({n + d for n in lengths for d in (-1, 0, 1)}):
            fitting = [k for k in coded.rates if lengths[k] <= budget]
            if not fitting:
                with pytest.raises(BudgetError):
                    encode_within(coded.point.edge, x, sizes, budget)
                continue
            encoded = encode_within(coded.point.edge, x, sizes, budget)
            assert len(encoded.data) <= budget
            assert encoded.data == coded.payloads[max(fitting)][i], (i, budget, lengths)


def test_with_an_exact_prediction_the_adaptive_device_is_never_over_budget(coded):
    """Oracle mode: the budget is what the link carries from the transfer's real start to the
    deadline; every frame whose smallest payload fits is sent within its budget, at the highest
    rate the search allows, and is on time."""
    policy = coded.adaptive(repeat=1)
    policy.encode_ms, policy.server_ms = 5.0, 10.0
    sizes = [[len(p) for p in coded.payloads[k]] for k in coded.rates]
    trace = make_trace("lte-m", 0, 60_000.0)
    frames = simulate(trace, [250.0 * i for i in range(len(coded.inputs))], 130.0, policy, predictor="oracle")
    fitted = [f for f in frames if sizes[0][f.index] <= f.budget]
    assert fitted and len({f.rate for f in fitted}) > 1  # a run that exercises the choice
    for f in frames:
        if f in fitted:
            assert f.bytes <= f.budget and f.on_time, f
            assert f.rate == coded.rates[-1] or sizes[f.rate + 1][f.index] > f.budget, f
        else:
            assert f.rate == 0 and f.bytes == sizes[0][f.index] > f.budget


@pytest.mark.parametrize("predictor", ["ewma", "oracle"])
def test_a_deadline_spent_before_sending_sends_rate_0_late(coded, predictor):
    """Device and server time alone exceed the deadline (budget ≤ 0 bytes): every frame goes at
    rate 0 and is late; the run does not fail."""
    policy = coded.adaptive(repeat=1)
    policy.encode_ms, policy.server_ms = 40.0, 30.0
    trace = make_trace("lte-m", 0, 60_000.0)
    frames = simulate(trace, [250.0 * i for i in range(len(coded.inputs))], 50.0, policy, predictor=predictor)
    assert len(frames) == len(coded.inputs)
    for f in frames:
        assert f.budget <= 0 and f.rate == 0 and f.bytes == len(coded.payloads[0][f.index]) and not f.on_time, f


@pytest.mark.slow
def test_bench_link_command_writes_its_section_and_plot(vr_bundle_dir, tmp_path, capsys):
    from splitserve.cli import main
    from splitserve.data import make_fmnist_scenes

    data = tmp_path / "fm"
    make_fmnist_scenes(data, train_scenes=2, val_scenes=5, image_size=64, seed=0, progress=False)
    doc, plot = tmp_path / "bench.md", tmp_path / "link.png"
    doc.write_text("# Benchmarks\n")
    args = ["bench", "link", "--bundle", str(vr_bundle_dir), "--data", str(data), "--frames", "5", "--fps", "4",
            "--deadline-ms", "150", "--repeat", "1", "--encode-ms", "5", "--server-ms", "10", "--plot", str(plot),
            "--output", str(doc)]
    assert main(args) == 0
    text = doc.read_text()
    assert "<!-- bench:link:lte-m -->" in text and "arithmetic on those byte counts" in text
    rows = [line for line in text.splitlines() if line.startswith(("| adaptive", "| fixed"))]
    assert [r.split(" | ")[0] for r in rows] == ["| adaptive es-r18-vr4"] + [f"| fixed es-r18-vr4 r{k}" for k in range(4)]
    assert "](link.png)" in text and plot.stat().st_size > 10_000  # linked from the Markdown file's folder
    capsys.readouterr()
    assert main([*args[:-4], "--frames", "99"]) == 2  # more frames than val images: one line, exit 2
    assert capsys.readouterr().err.startswith("platform bench link: error: ")


def test_frame_is_on_time_up_to_float_slack():
    f = Frame(0, 0.0, 0, 10, None, None, 0.0, 1.0, 60.0 + 1e-9, 60.0)
    assert f.on_time and not Frame(0, 0.0, 0, 10, None, None, 0.0, 1.0, 60.01, 60.0).on_time


def test_the_report_says_where_its_times_come_from():
    from splitserve.bench.link import _times

    both = _times(["encode 3 ms", "server 10 ms"])
    assert both == "Times given, the same for every policy: encode 3 ms, server 10 ms." and "measured" not in both
    one = _times(["server 10 ms"])
    assert one.startswith("Server 10 ms given for every policy; the other time is a median measured here")
    assert _times([]).startswith("Encode and server times are medians measured here at batch 1")
