"""`bastion.evaluation`: worst case per example, streaming, resume, the report and the grid.

Everything runs on the session's `digits_model` (8×8 digits) with cheap, mostly deterministic
attacks, so that "the same examples" can be compared exactly between runs.
"""

from __future__ import annotations

import json
import math
import statistics
import struct
from dataclasses import dataclass, field
import pytest
import torch
from torch import Tensor, nn

import bastion
from bastion.attacks import FGSM, PGD, Attack, list_attacks
from bastion.evaluation import PRESETS, Report, evaluate, resolve_attacks, save_grid
from bastion.threat import ThreatModel

EPS = 0.1
DET = [("fgsm", {}), ("fgsm", {"loss": "dlr"}), ("pgd", {"steps": 3, "random_start": False, "loss": "cw"})]


# --------------------------------------------------------------------------- spies
class Recorder:
    """Shared, mutable call log of a `Spy` (not a dataclass: it stays out of the attack's config)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[Tensor] = []
        self.threats: list[ThreatModel] = []
        self.fail_at = fail_at


@dataclass(frozen=True)
class Spy(Attack):
    """Runs `inner` and records what it was given; raises on call number `rec.fail_at`."""

    inner: Attack = field(default_factory=FGSM)
    rec: Recorder = field(default_factory=Recorder)

    name = "spy"
    supports_norms = ("linf", "l2")

    @property
    def randomized(self) -> bool:
        return self.inner.randomized

    def _run(self, model, x, y, threat, targets, rng):
        self.rec.calls.append(x.clone())
        self.rec.threats.append(threat)
        if self.rec.fail_at is not None and len(self.rec.calls) == self.rec.fail_at:
            raise RuntimeError("simulated crash")
        return self.inner._run(model, x, y, threat, targets, rng)


@dataclass(frozen=True)
class SmallEpsOnly(Attack):
    """FGSM below eps 0.1, nothing above: an attack whose curve rises (what masking looks like)."""

    name = "small-eps-only"
    supports_norms = ("linf",)

    def _run(self, model, x, y, threat, targets, rng):
        return FGSM()._run(model, x, y, threat, targets, rng) if threat.eps <= 0.1 else x


def rows_of(calls: list[Tensor], x: Tensor) -> list[int]:
    """Indices into `x` of every row an attack was called on (the rows of `x` are distinct)."""
    out = []
    for c in calls:
        eq = (c.flatten(1)[:, None, :] == x.flatten(1)[None, :, :]).all(dim=2)
        assert bool((eq.sum(dim=1) == 1).all()), "an attacked row matches no (or several) data rows"
        out += eq.float().argmax(dim=1).tolist()
    return out


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data(digits, digits_model) -> tuple[Tensor, Tensor]:
    """48 distinct test digits, with every test example the model gets wrong among them."""
    x, y = digits["x_test"], digits["y_test"]
    with torch.no_grad():
        wrong = (digits_model(x).argmax(1) != y).nonzero().squeeze(1)
    idx = torch.cat([torch.arange(40), wrong[:8]]).unique()[:48]
    xs, ys = x[idx].clone(), y[idx].clone()
    assert len(torch.unique(xs.flatten(1), dim=0)) == len(xs)
    return xs, ys


@pytest.fixture(scope="module")
def suite_report(digits_model, data) -> Report:
    return evaluate(digits_model, data, f"linf:{EPS}", DET, batch_size=16, progress=False, keep_examples=12)


# --------------------------------------------------------------------------- worst case per example
def test_robust_set_is_the_intersection_of_each_attacks_robust_set(digits_model, data, suite_report):
    alone = [evaluate(digits_model, data, f"linf:{EPS}", [a], batch_size=16, progress=False) for a in DET]
    sets = [set(r.robust_set()) for r in alone]
    assert set(suite_report.robust_set()) == set.intersection(*sets)
    # not vacuous: the attacks disagree, some examples fall, some stand
    assert len({frozenset(s) for s in sets}) > 1
    assert 0 < len(suite_report.robust_set()) < sum(suite_report.per_example["clean_correct"])
    # the cumulative row after the last attack is the worst case, and each attack alone is no stronger
    assert suite_report.attacks[-1].robust_accuracy == suite_report.robust_accuracy
    assert all(r.robust_accuracy >= suite_report.robust_accuracy for r in alone)

    both = evaluate(digits_model, data, f"linf:{EPS}", DET, batch_size=16, progress=False, standalone=True)
    assert set(both.robust_set()) == set(suite_report.robust_set())
    assert [a.standalone_accuracy for a in both.attacks] == [r.robust_accuracy for r in alone]
    assert both.per_example["broken_by"] == suite_report.per_example["broken_by"]


def test_later_attacks_run_only_on_survivors_and_never_on_misclassified(digits_model, data):
    x, y = data
    first, second = Spy(rec=Recorder()), Spy(inner=PGD(steps=3, random_start=False), rec=Recorder())
    rep = evaluate(digits_model, data, f"linf:{EPS}", [first, second], batch_size=10, progress=False)
    pe = rep.per_example
    correct = [i for i, c in enumerate(pe["clean_correct"]) if c]
    assert len(correct) < len(y), "the data must hold misclassified examples"
    assert sorted(rows_of(first.rec.calls, x)) == correct
    survivors = [i for i in correct if pe["success"]["spy"][i] is False]
    assert 0 < len(survivors) < len(correct)
    assert sorted(rows_of(second.rec.calls, x)) == survivors
    # streaming: no attack ever sees more than one batch
    assert all(len(c) <= 10 for c in first.rec.calls + second.rec.calls)
    # one call per batch that holds a correctly classified example (a batch of misclassified ones costs none)
    assert len(first.rec.calls) == len({i // 10 for i in correct}) and len(correct) < 10 * math.ceil(len(y) / 10)
    # misclassified examples: non-robust, never attacked, adversarial prediction = clean prediction
    for i, c in enumerate(pe["clean_correct"]):
        if not c:
            assert pe["broken_by"][i] is None and pe["success"]["spy"][i] is None and pe["success"]["spy#2"][i] is None
            assert pe["adv_pred"][i] == pe["clean_pred"][i] != pe["label"][i]
    assert rep.attacks[0].n_attacked == len(correct) and rep.attacks[1].n_attacked == len(survivors)


def test_per_example_records_and_norms(digits_model, data, suite_report):
    x, y = data
    pe = suite_report.per_example
    assert pe["label"] == y.tolist()
    broken = [i for i, b in enumerate(pe["broken_by"]) if b is not None]
    assert broken
    for i in broken:
        assert pe["clean_correct"][i] and pe["adv_pred"][i] != pe["label"][i]
        assert pe["linf"][i] <= EPS + 1e-6 and pe["l2"][i] > 0 and pe["l0"][i] >= 1
        assert pe["success"][pe["broken_by"][i]][i] is True
    for i, b in enumerate(pe["broken_by"]):
        if b is None:
            assert pe["linf"][i] is None
    # summary statistics are those of the per-example column
    assert suite_report.norms["l2"]["median"] == statistics.median(pe["l2"][i] for i in broken)
    assert suite_report.norms["linf"]["mean"] <= EPS + 1e-6
    assert suite_report.clean_accuracy == sum(pe["clean_correct"]) / len(y)
    # examples kept for the picture: x_adv is the breaking example, within the ball
    ex = suite_report.examples
    assert ex is not None and ex["x_adv"].shape == (12, *x.shape[1:])
    assert bool(ThreatModel.parse(f"linf:{EPS}").contains(ex["x_adv"], ex["x"]).all())
    with torch.no_grad():
        assert digits_model(ex["x_adv"]).argmax(1).tolist() == ex["adv_pred"].tolist() == pe["adv_pred"][:12]


def test_l2_threat_skips_linf_only_attacks_with_a_note(digits_model, data):
    rep = evaluate(digits_model, data, "l2:1.0", [("fgsm", {}), ("fgm", {})], batch_size=48, progress=False)
    fgsm, fgm = rep.attacks
    assert fgsm.skipped and "linf" in fgsm.skipped and fgsm.n_attacked == 0
    assert any("fgsm skipped" in n for n in rep.notes)
    assert fgm.skipped is None and fgm.n_success > 0
    broken = [i for i, b in enumerate(rep.per_example["broken_by"]) if b]
    assert max(rep.per_example["l2"][i] for i in broken) <= 1.0 + 1e-5


def test_gradient_free_attacks_report_queries(digits_model, data):
    if "square" not in list_attacks():
        pytest.skip("attack 'square' is not in the registry yet")
    rep = evaluate(digits_model, (data[0][:16], data[1][:16]), f"linf:{EPS}", [("square", {"n_queries": 30})],
                   progress=False)
    q = rep.attacks[0].queries
    assert q is not None and q["total"] > 0 and q["mean"] <= 30 + 1
    broken = [i for i, b in enumerate(rep.per_example["broken_by"]) if b]
    assert all(rep.per_example["queries"][i] is not None for i in broken)


# --------------------------------------------------------------------------- curve
def test_security_curve_is_monotone_for_pgd(digits_model, data):
    eps = [0.02, 0.05, 0.1, 0.2]
    rep = evaluate(digits_model, data, "linf:0.1", [("pgd", {"steps": 10})], epsilons=eps, batch_size=48,
                   progress=False)
    accs = [c.robust_accuracy for c in rep.curve]
    assert [c.eps for c in rep.curve] == eps
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[0] > accs[-1]
    assert rep.curve[2].robust_accuracy == rep.robust_accuracy  # the main threat is a point of the curve
    assert not any("rises" in n for n in rep.notes)


def test_a_rising_curve_is_flagged(digits_model, data):
    rep = evaluate(digits_model, data, "linf:0.05", [SmallEpsOnly()], epsilons=[0.05, 0.2], batch_size=48,
                   progress=False)
    assert rep.curve[1].robust_accuracy > rep.curve[0].robust_accuracy
    assert any("rises" in n and "gradient masking" in n for n in rep.notes)


# --------------------------------------------------------------------------- report
def test_report_json_round_trip(suite_report, tmp_path):
    path = suite_report.save(tmp_path / "report.json")
    raw = json.loads(path.read_text())
    assert raw["schema"] == "bastion-report/1"
    for key in ("threat", "n", "clean_accuracy", "robust_accuracy", "attacks", "norms", "per_example", "config"):
        assert key in raw
    back = Report.load(path)
    assert back == suite_report
    assert Report.from_dict(suite_report.to_dict()) == suite_report
    changed = suite_report.to_dict()
    changed["per_example"]["broken_by"][0] = "nobody"
    assert Report.from_dict(changed) != suite_report
    with pytest.raises(ValueError, match="schema"):
        Report.from_dict({**raw, "schema": "bastion-report/0"})


def test_table_and_summary(suite_report):
    table = suite_report.table()
    for a in suite_report.attacks:
        assert a.label in table and f"{100 * a.robust_accuracy:.2f}%" in table
    assert "worst case" in table and f"{100 * suite_report.clean_accuracy:.2f}%" in table
    s = suite_report.summary()
    assert f"robust accuracy {100 * suite_report.robust_accuracy:.2f}%" in s and "linf:0.1" in s


# --------------------------------------------------------------------------- resume
def test_resume_after_a_crash_gives_the_uninterrupted_results(digits_model, data, tmp_path):
    state = tmp_path / "eval.state.jsonl"
    inner = PGD(steps=3)  # randomized: resume must reproduce its per-example random starts too
    straight = evaluate(digits_model, data, f"linf:{EPS}", [Spy(inner=inner, rec=Recorder())], batch_size=12,
                        progress=False)
    crashing = Spy(inner=inner, rec=Recorder(fail_at=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(digits_model, data, f"linf:{EPS}", [crashing], batch_size=12, state_file=state, progress=False)
    lines = state.read_text().splitlines()
    assert len(lines) == 1 + 2  # header + the two finished batches

    again = Spy(inner=inner, rec=Recorder())
    resumed = evaluate(digits_model, data, f"linf:{EPS}", [again], batch_size=12, state_file=state, progress=False)
    assert len(again.rec.calls) == 2  # batches 3 and 4 only
    x, _ = data
    done = set(range(24))
    assert not done & set(rows_of(again.rec.calls, x))
    assert resumed.per_example == straight.per_example
    assert resumed.robust_accuracy == straight.robust_accuracy
    assert any("resumed: 2 of 4" in n for n in resumed.notes)

    # a finished state file: nothing is recomputed at all
    idle = Spy(inner=inner, rec=Recorder())
    final = evaluate(digits_model, data, f"linf:{EPS}", [idle], batch_size=12, state_file=state, progress=False)
    assert idle.rec.calls == [] and final.per_example == straight.per_example


def test_resume_drops_a_torn_last_line(digits_model, data, tmp_path):
    state = tmp_path / "s.jsonl"
    first = evaluate(digits_model, data, f"linf:{EPS}", [Spy(rec=Recorder())], batch_size=16, state_file=state,
                     progress=False)
    lines = state.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 3
    state.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a crash mid-write
    spy = Spy(rec=Recorder())
    again = evaluate(digits_model, data, f"linf:{EPS}", [spy], batch_size=16, state_file=state, progress=False)
    assert len(spy.rec.calls) == 1  # only the torn batch is redone
    assert again.per_example == first.per_example
    fixed = state.read_text().splitlines()
    assert len(fixed) == len(lines) and [json.loads(t)["batch"] for t in fixed[1:]] == [0, 1, 2]


def test_resume_refuses_another_configuration_or_data(digits_model, data, tmp_path):
    state = tmp_path / "s.jsonl"
    evaluate(digits_model, data, f"linf:{EPS}", ["fgsm"], batch_size=16, state_file=state, progress=False)
    with pytest.raises(ValueError, match="another evaluation.*threat"):
        evaluate(digits_model, data, "linf:0.2", ["fgsm"], batch_size=16, state_file=state, progress=False)
    with pytest.raises(ValueError, match="attacks"):
        evaluate(digits_model, data, f"linf:{EPS}", [("fgsm", {"loss": "cw"})], batch_size=16, state_file=state,
                 progress=False)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="model_digest"):
        evaluate(other, data, f"linf:{EPS}", ["fgsm"], batch_size=16, state_file=state, progress=False)
    x, y = data
    with pytest.raises(ValueError, match="batch 0 holds other examples"):
        evaluate(digits_model, (x.flip(0), y.flip(0)), f"linf:{EPS}", ["fgsm"], batch_size=16, state_file=state,
                 progress=False)


# --------------------------------------------------------------------------- grid
def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_grid_png(suite_report, tmp_path):
    ex = suite_report.examples
    p = save_grid(tmp_path / "sub" / "grid.png", ex["x"], ex["x_adv"], ex["y"], ex["clean_pred"], ex["adv_pred"],
                  [str(i) for i in range(10)], n=8)
    assert _png_size(p) == (8 * 150, 450)
    rgb = torch.rand(3, 3, 16, 16)
    q = save_grid(tmp_path / "rgb.png", rgb, (rgb + 0.05).clamp(0, 1), torch.tensor([0, 1, 2]),
                  torch.tensor([0, 1, 0]), torch.tensor([1, 1, 2]), None, n=8)
    assert _png_size(q) == (3 * 150, 450)  # fewer examples than n: one column each
    with pytest.raises(ValueError, match="channels"):
        save_grid(tmp_path / "bad.png", torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8), torch.zeros(2), torch.zeros(2),
                  torch.zeros(2))


# --------------------------------------------------------------------------- presets and bad input
def test_presets_are_immutable_and_resolve():
    assert [n for n, _ in PRESETS["quick"]] == ["pgd"] and dict(PRESETS["quick"][0][1]) == {"steps": 20, "loss": "ce"}
    assert [n for n, _ in PRESETS["standard"]] == ["apgd", "apgd-t", "square"]
    assert dict(PRESETS["standard"][2][1])["n_queries"] == 5000
    assert [n for n, _ in PRESETS["full"]][3:] == ["cw", "deepfool", "spsa"]
    with pytest.raises(TypeError):
        PRESETS["quick"][0][1]["steps"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["mine"] = ()  # type: ignore[index]
    for e in resolve_attacks("full"):
        # a preset attack that is not installed yet is skipped with a note, never an error
        assert (e.attack is None) == (e.name not in list_attacks())
        if e.attack is None:
            assert "not installed" in e.skip_reason(ThreatModel.parse("l2:1"))
    cw = [e for e in resolve_attacks("full") if e.name == "cw"][0]
    assert cw.skip_reason(ThreatModel.parse("linf:0.1")) is not None  # C&W: l2 threats only


def test_quick_preset_runs(digits_model, data):
    rep = evaluate(digits_model, (data[0][:16], data[1][:16]), f"linf:{EPS}", "quick", progress=False)
    assert [a.label for a in rep.attacks] == ["pgd"] and rep.attacks[0].config["steps"] == 20
    assert rep.robust_accuracy < rep.clean_accuracy


@pytest.mark.slow
def test_standard_preset_runs(digits_model, data):
    rep = evaluate(digits_model, (data[0][:24], data[1][:24]), f"linf:{EPS}", "standard", progress=False)
    assert [a.label for a in rep.attacks] == ["apgd", "apgd-t", "square"]
    assert rep.robust_accuracy < rep.clean_accuracy


def test_bad_input_is_named(digits_model, data):
    with pytest.raises(ValueError, match="unknown preset 'strongest'.*quick, standard, full"):
        evaluate(digits_model, data, "linf:0.1", "strongest", progress=False)
    with pytest.raises(KeyError, match="unknown attack 'pgdd'.*pgd"):
        evaluate(digits_model, data, "linf:0.1", ["pgdd"], progress=False)
    with pytest.raises(TypeError, match="no hyper-parameter 'stepz'"):
        evaluate(digits_model, data, "linf:0.1", [("pgd", {"stepz": 3})], progress=False)
    with pytest.raises(ValueError, match="NORM:EPS"):
        evaluate(digits_model, data, "linf-0.1", ["fgsm"], progress=False)
    with pytest.raises(ValueError, match="`batch_size`"):
        evaluate(digits_model, data, "linf:0.1", ["fgsm"], batch_size=0)
    with pytest.raises(ValueError, match="`attacks` is empty"):
        evaluate(digits_model, data, "linf:0.1", [])
    with pytest.raises(TypeError, match="`data`"):
        evaluate(digits_model, data[0], "linf:0.1", ["fgsm"])
    with pytest.raises(ValueError, match="`epsilons`"):
        evaluate(digits_model, data, "linf:0.1", ["fgsm"], epsilons=[])
    with pytest.raises(TypeError, match="`model`"):
        evaluate(lambda t: t, data, "linf:0.1", ["fgsm"])


def test_exported_at_top_level():
    assert bastion.evaluate is evaluate
