"""Pure pieces behind gen_synthetic.py and eval_winrate.py, against numbers worked out by hand: the win rate with
ties excluded, its Wilson interval, the margin-weighted win rate, the length-controlled win rate and its bootstrap
intervals (closed forms, a likelihood grid search), answer and pair lengths, the (best, worst) pair of a prompt's
samples, and the kill-proof JSONL (torn last line dropped, atomic rewrite, errors that name file:line)."""
import json
import math
import statistics

import numpy as np
import pytest

from nanoalign import jsonl
from nanoalign.jsonl import ResumableJsonl, read_jsonl
from nanoalign.preferences import (answer_lengths, best_worst_pair, length_controlled, pair_lengths, wilson_interval,
                                   win_rate)

Z = 1.959964
Z2 = 3.841458881  # Z * Z = (1.96 - 0.000036)^2 = 3.8416 - 0.00014112 + 0.0000000013


# -----------------------------------------------------------------------------
# win rate

def test_win_rate_30_wins_10_losses_5_ties():
    # A beats B on 30 prompts by 1.0, loses 10 by 1.0, ties 5 at 0.5 each
    a = [1.0] * 30 + [0.0] * 10 + [0.5] * 5
    b = [0.0] * 30 + [1.0] * 10 + [0.5] * 5
    r = win_rate(a, b)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (30, 10, 5, 45)
    assert r["win_rate"] == 0.75  # 30 / 40: the 5 ties are counted, not in the denominator
    # Wilson over n = 40 decided, p = 0.75:
    #   z^2/n = 0.0960365, denom = 1.0960365
    #   center = (0.75 + 0.0480182) / 1.0960365 = 0.7280946
    #   half = 1.959964 * sqrt(0.1875/40 + 3.8414589/6400) / 1.0960365
    #        = 1.959964 * sqrt(0.0046875 + 0.0006002) / 1.0960365 = 1.959964 * 0.0727168 / 1.0960365 = 0.1300342
    #   -> [0.5980604, 0.8581288]
    low, high = r["ci95"]
    assert low == pytest.approx(0.5981, abs=5e-5) and high == pytest.approx(0.8581, abs=5e-5)
    assert r["mean_reward_a"] == pytest.approx(32.5 / 45)  # (30 * 1 + 5 * 0.5) / 45 = 0.72222
    assert r["mean_reward_b"] == pytest.approx(12.5 / 45)  # (10 * 1 + 5 * 0.5) / 45 = 0.27778
    assert r["margin_weighted_win_rate"] == pytest.approx(0.75)  # 30 * 1.0 / (30 * 1.0 + 10 * 1.0)


def test_margin_weighted_win_rate_and_means_on_a_small_example():
    a = [1.0, 0.5, 0.25, 0.75]
    b = [0.0, 0.75, 0.25, 0.5]
    # diffs: +1.0 (win), -0.25 (loss), 0 (tie), +0.25 (win)
    r = win_rate(a, b)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == pytest.approx(2 / 3)
    assert r["margin_weighted_win_rate"] == pytest.approx(1.25 / 1.5)  # (1.0 + 0.25) / (1.0 + 0.25 + 0.25) = 0.8333
    assert r["mean_reward_a"] == pytest.approx(0.625)  # 2.5 / 4
    assert r["mean_reward_b"] == pytest.approx(0.375)  # 1.5 / 4
    # Wilson for 2 of 3: p = 2/3, z^2/n = 1.2804863, denom = 2.2804863
    #   center = (0.6666667 + 0.6402431) / 2.2804863 = 0.5730838
    #   half = 1.959964 * sqrt(0.0740741 + 0.1067072) / 2.2804863 = 1.959964 * 0.4251838 / 2.2804863 = 0.3654242
    #   -> [0.2076596, 0.9385080]
    low, high = r["ci95"]
    assert low == pytest.approx(0.2077, abs=5e-5) and high == pytest.approx(0.9385, abs=5e-5)


def test_tie_eps_turns_small_margins_into_ties():
    a = [1.0, 0.5, 0.25, 0.75]
    b = [0.0, 0.75, 0.25, 0.5]
    # tie_eps 0.25: |diff| <= 0.25 is a tie, the boundary included -> only the +1.0 is decided
    r = win_rate(a, b, tie_eps=0.25)
    assert (r["wins"], r["losses"], r["ties"]) == (1, 0, 3)
    assert r["win_rate"] == 1.0
    assert r["margin_weighted_win_rate"] == 1.0  # ties leave the margin sums too: 1.0 / 1.0
    # Wilson for 1 of 1: center = (1 + z^2/2) / (1 + z^2), half = (z^2/2) / (1 + z^2), so
    #   low = 1 / (1 + z^2) = 1 / 4.8414589 = 0.2065493, high = 1
    low, high = r["ci95"]
    assert low == pytest.approx(1 / (1 + Z2), abs=1e-6) and low == pytest.approx(0.2065, abs=5e-5)
    assert high == pytest.approx(1.0, abs=1e-12)
    # just above the boundary the small margins count again
    r = win_rate(a, b, tie_eps=0.2)
    assert (r["wins"], r["losses"], r["ties"]) == (2, 1, 1)


def test_all_ties_give_no_win_rate_and_the_whole_interval():
    r = win_rate([0.5, 0.25, 1.0], [0.5, 0.25, 1.0])
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (0, 0, 3, 3)
    assert r["win_rate"] is None and r["margin_weighted_win_rate"] is None  # JSON null, never NaN
    assert r["ci95"] == [0.0, 1.0]
    assert r["mean_reward_a"] == r["mean_reward_b"] == pytest.approx(1.75 / 3)
    assert win_rate([], [])["mean_reward_a"] is None
    json.dumps(win_rate([], []), allow_nan=False)
    with pytest.raises(AssertionError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(AssertionError, match="non-finite"):
        win_rate([1.0, float("nan")], [1.0, 2.0])


def test_wilson_bounds_stay_in_the_unit_interval():
    # 0 of 135: the exact lower end is 0, but center - half rounds to -1.7e-18 ("-0.000" when printed)
    low, high = wilson_interval(0, 135)
    assert low == 0.0 and f"{low:.3f}" == "0.000" and high == pytest.approx(Z * Z / (135 + Z * Z), abs=1e-12)
    for n in range(1, 400):
        for wins in (0, n):
            low, high = wilson_interval(wins, n)
            assert 0.0 <= low <= high <= 1.0 and f"{low:.3f}"[0] != "-"
            # the interval holds the observed rate: 136 of 136 gave high 0.9999999999999999 < 1.0, and the
            # demo's error bar (high - win_rate) came out negative
            assert low <= wins / n <= high, (wins, n, low, high)


@pytest.mark.parametrize("wins,n", [(0, 5), (3, 7), (30, 40), (99, 100), (100, 100)])
def test_wilson_endpoints_solve_the_score_equation(wins, n):
    # the Wilson interval is {p : |p_hat - p| <= z * sqrt(p (1 - p) / n)}: its ends are the roots of
    # (p_hat - p)^2 = z^2 p (1 - p) / n, a second reference besides the closed form
    low, high = wilson_interval(wins, n)
    p_hat = wins / n
    for p in (low, high):
        assert (p_hat - p) ** 2 == pytest.approx(Z * Z * p * (1 - p) / n, abs=1e-12)
    assert 0.0 <= low <= p_hat <= high <= 1.0 + 1e-12
    assert wilson_interval(0, 0) == (0.0, 1.0)


# -----------------------------------------------------------------------------
# length-controlled win rate: P(A wins) = sigmoid(a + b tanh(dlen / sd)), LC = sigmoid(a)

def cells(*groups):
    """verdicts and length differences from (delta, wins, losses, ties) groups."""
    verdicts, deltas = [], []
    for delta, wins, losses, ties in groups:
        verdicts += ["a"] * wins + ["b"] * losses + ["tie"] * ties
        deltas += [delta] * (wins + losses + ties)
    return verdicts, deltas


def test_lc_when_length_explains_every_win():
    # A is longer by 10 tokens on 800 prompts and wins 95% of them, equal length on 40 (wins half), shorter by 10
    # on 40 (wins 5%); 30 ties. Raw: 782 / 880 = 0.889. The win log-odds at the three lengths, ln 19, 0 and
    # -ln 19, lie on a line in x = tanh(dlen / sd), so the two-parameter fit is exact there: a = 0, b = ln 19 / x+,
    # and at equal length A wins half the time.
    r = length_controlled(*cells((10, 760, 40, 30), (0, 20, 20, 0), (-10, 2, 38, 0)))
    sd = statistics.stdev([10] * 800 + [0] * 40 + [-10] * 40)  # decided prompts only: 4.5707
    assert sd == pytest.approx(10 * math.sqrt((800 * (120 / 880) ** 2 + 40 * (760 / 880) ** 2
                                              + 40 * (1640 / 880) ** 2) / 879))
    model = r["length_model"]
    assert model["sd_delta_tokens"] == pytest.approx(sd, rel=1e-12)
    assert model["slope"] == pytest.approx(math.log(19) / math.tanh(10 / sd), rel=1e-4)  # 3.0195 (ridge: 1e-5)
    assert model["intercept"] == pytest.approx(0.0, abs=1e-4)
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=1e-4)
    lo, hi = r["lc_ci95"]
    assert lo < 0.5 < hi < 782 / 880  # the interval holds 0.5, not the raw rate
    # the raw rate's bootstrap interval is close to the normal approximation p -+ 1.96 sqrt(p (1 - p) / n)
    p = 782 / 880
    half = 1.959964 * math.sqrt(p * (1 - p) / 880)  # 0.0208
    assert r["bootstrap_ci95"] == pytest.approx([p - half, p + half], abs=3e-3)
    assert r["bootstrap"] == {"resamples": 1000, "seed": 0}
    assert length_controlled(*cells((10, 760, 40, 30), (0, 20, 20, 0), (-10, 2, 38, 0))) == r  # fixed seed


def test_lc_equals_raw_when_length_is_unrelated_to_the_verdict():
    # the same 7 wins in 10 at every length difference: the likelihood's slope equation sum (y - p) x = 0 holds
    # at p = 0.7 everywhere, so b = 0 (the ridge pulls towards 0 too) and LC = raw = 0.7
    r = length_controlled(*cells(*[(delta, 7, 3, 2) for delta in (-6, -2, 0, 3, 8, 20)]))
    assert r["length_model"]["slope"] == pytest.approx(0.0, abs=1e-9)
    assert r["length_model"]["intercept"] == pytest.approx(math.log(0.7 / 0.3), abs=1e-9)
    assert r["lc_win_rate"] == pytest.approx(0.7, abs=1e-9)
    for name in ("lc_ci95", "bootstrap_ci95"):
        lo, hi = r[name]
        assert lo < 0.7 < hi and 0.05 < hi - lo < 0.35, name  # 60 decided prompts: +-0.12 or so


def test_lc_matches_a_likelihood_grid_search():
    # noisy verdicts, lengths from -30 to 40: the fitted (a, b) maximise the log-likelihood of a fine grid
    rng = np.random.default_rng(3)
    deltas = rng.integers(-30, 41, 300)
    won = rng.random(300) < 1 / (1 + np.exp(-(0.4 + 1.2 * np.tanh(deltas / deltas.std()))))
    r = length_controlled(["a" if w else "b" for w in won], deltas.tolist())
    x = np.tanh(deltas / statistics.stdev(deltas.tolist()))

    def grid_max(a_values, b_values):
        a, b = np.meshgrid(a_values, b_values, indexing="ij")
        z = a[..., None] + b[..., None] * x                               # [grid a, grid b, prompts]
        loglik = (won * z - np.logaddexp(0, z)).sum(-1)
        i, j = np.unravel_index(loglik.argmax(), loglik.shape)
        assert 0 < i < a.shape[0] - 1 and 0 < j < a.shape[1] - 1  # the maximum is inside the grid
        return a[i, j], b[i, j]

    a0, b0 = grid_max(np.arange(-1, 2, 0.05), np.arange(-1, 3, 0.05))    # coarse, then fine around its best
    a, b = grid_max(np.arange(a0 - 0.06, a0 + 0.06, 0.001), np.arange(b0 - 0.06, b0 + 0.06, 0.001))
    model = r["length_model"]
    assert model["intercept"] == pytest.approx(a, abs=1e-3) and model["slope"] == pytest.approx(b, abs=1e-3)
    assert r["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-a)), abs=3e-4)
    for name, point in (("lc_ci95", r["lc_win_rate"]), ("bootstrap_ci95", won.mean())):
        lo, hi = r[name]
        assert lo < point < hi, name  # the bootstrap interval holds the point estimate


def test_lc_degenerate_cases():
    none = dict(lc_win_rate=None, lc_ci95=None, bootstrap_ci95=None, length_model=None,
                bootstrap={"resamples": 1000, "seed": 0})
    assert length_controlled(*cells((3, 0, 0, 4), (-2, 0, 0, 1))) == none  # all ties: nothing decided
    assert length_controlled([], []) == none
    # one decided prompt among ties: no length term to fit, LC = raw = 1; a resample that misses it is left out
    r = length_controlled(*cells((5, 1, 0, 0), (0, 0, 0, 3)))
    assert (r["lc_win_rate"], r["length_model"], r["lc_ci95"], r["bootstrap_ci95"]) == (1.0, None, [1.0, 1.0],
                                                                                          [1.0, 1.0])
    # one length difference for every prompt: sd 0, no division by it, LC = raw in the estimate and every resample
    r = length_controlled(*cells((4, 6, 2, 1)))
    assert r["lc_win_rate"] == 0.75 and r["length_model"] is None and r["lc_ci95"] == r["bootstrap_ci95"]
    # every decided prompt won, lengths varied: the likelihood rises towards a = +inf, whose limit is LC = 1 = raw
    r = length_controlled(*cells((4, 6, 0, 1), (-3, 2, 0, 0), (9, 1, 0, 0)))
    assert (r["lc_win_rate"], r["length_model"], r["lc_ci95"]) == (1.0, None, [1.0, 1.0])
    assert length_controlled(*cells((4, 0, 6, 1), (-3, 0, 2, 0)))["lc_win_rate"] == 0.0


def test_lc_stays_finite_when_length_separates_wins_from_losses():
    # every longer answer wins, every shorter one loses: the maximum likelihood has b = +inf; the ridge on b keeps
    # it finite. Symmetric lengths and counts: a = 0 by symmetry, LC = 0.5
    r = length_controlled(*cells((4, 5, 0, 0), (-4, 0, 5, 0)))
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=1e-9) and 5 < r["length_model"]["slope"] < 50
    json.dumps(r, allow_nan=False)
    # two longer answers won, one shorter lost, and one of equal length won: still finite, strict JSON
    r = length_controlled(*cells((4, 2, 0, 0), (-4, 0, 1, 0), (0, 1, 0, 0)))
    assert 0.5 < r["lc_win_rate"] < 1 and all(math.isfinite(v) for v in r["length_model"].values())
    json.dumps(r, allow_nan=False)


def test_answer_and_pair_lengths():
    r = answer_lengths(["9", "", " \n", "The answer is 9."], [1, 0, 1, 6], [True, True, False, True])
    assert r == dict(mean_tokens=2.0, median_tokens=1.0, empty_share=0.5, truncated_share=0.25)
    r = answer_lengths(["a", "b c"], [1, 2], [None, None])  # stored answers: endings unknown
    assert r == dict(mean_tokens=1.5, median_tokens=1.5, empty_share=0.0, truncated_share=None)
    assert set(answer_lengths([], [], []).values()) == {None}
    # chosen - rejected: +3, 0, -1, +5 -> mean 6.5 vs 4.75, longer in 2 of 4, median of (-1, 0, 3, 5) = 1.5
    r = pair_lengths([5, 4, 2, 15], [2, 4, 3, 10])
    assert r == dict(mean_chosen_tokens=6.5, mean_rejected_tokens=4.75, chosen_longer_share=0.5,
                     median_delta_tokens=1.5)
    assert set(pair_lengths([], []).values()) == {None}


# -----------------------------------------------------------------------------
# best / worst pair

def test_best_worst_pair_picks_max_and_min():
    samples = [dict(response="a", score=0.25), dict(response="b", score=1.0), dict(response="c", score=-0.5),
               dict(response="d", score=0.5)]
    best, worst = best_worst_pair(samples)
    assert best is samples[1] and worst is samples[2]
    assert best_worst_pair(samples, min_gap=1.5) == (samples[1], samples[2])  # gap 1.0 - (-0.5) = 1.5: kept
    assert best_worst_pair(samples, min_gap=1.5001) is None


def test_best_worst_pair_none_for_equal_scores_and_too_few_samples():
    assert best_worst_pair([dict(response="a", score=0.3), dict(response="b", score=0.3)]) is None  # min_gap 0
    assert best_worst_pair([dict(response="a", score=0.3), dict(response="b", score=0.3)], min_gap=-1.0) is None
    assert best_worst_pair([dict(response="a", score=0.3)]) is None
    assert best_worst_pair([]) is None


# -----------------------------------------------------------------------------
# ResumableJsonl / read_jsonl

def lines(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def test_torn_last_line_is_dropped_on_reopen(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    f = ResumableJsonl(path)  # creates the folder, no file yet
    assert f.rows == []
    rows = [{"i": 0, "text": "héllo"}, {"i": 1}, {"i": 2}]
    f.append(rows[:2])
    f.append(rows[2:])
    f.append([])
    assert path.read_bytes() == lines(rows)
    with path.open("a") as h:  # a kill in the middle of a write
        h.write('{"i": 3, "te')
    f = ResumableJsonl(path)
    assert f.rows == rows
    assert path.read_bytes() == lines(rows)  # the torn bytes are gone from the file too
    f.append([{"i": 3}])
    assert read_jsonl(path) == rows + [{"i": 3}]
    # a file holding nothing but a torn line
    path.write_text('{"i": 0')
    assert ResumableJsonl(path).rows == [] and path.read_bytes() == b""


def test_rewrite_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    f = ResumableJsonl(path)
    f.append([{"i": 0}, {"i": 1}, {"i": 2}])
    f.rewrite([{"i": 0}, {"i": 2}])
    assert path.read_bytes() == lines([{"i": 0}, {"i": 2}]) and f.rows == [{"i": 0}, {"i": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no temp file left
    assert ResumableJsonl(path).rows == [{"i": 0}, {"i": 2}]

    # killed before the rename: the old file is whole, never half-written
    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(jsonl.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        f.rewrite([{"i": 9}])
    assert path.read_bytes() == lines([{"i": 0}, {"i": 2}])


def test_read_jsonl_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"i": 0}\n\n{"i": 2,}\n{"i": 3}\n')  # line 2 blank (skipped), line 3 malformed
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON"):
        read_jsonl(path)
    # a resumable file drops a malformed line that is not the last, from the file too, and says so in one line
    assert ResumableJsonl(path).rows == [{"i": 0}, {"i": 3}]
    assert capsys.readouterr().out == (f"{path}:3: not JSON (Expecting property name enclosed in double quotes, "
                                       f"column 9): dropped 1 damaged row (line 3)\n")
    assert path.read_bytes() == b'{"i": 0}\n{"i": 3}\n'  # whole lines kept as they were
    path.write_text('{"i": 0}\n\n{"i": 2}\n')
    assert read_jsonl(path) == [{"i": 0}, {"i": 2}]
