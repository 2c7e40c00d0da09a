"""From reward scores to preferences and verdicts: the (best, worst) pair of a prompt's samples, the win rate of
model A over model B with ties excluded and a Wilson 95% interval, the length-controlled win rate with paired
bootstrap intervals, and the answer-length statistics printed beside them."""
import math
import re
import statistics
from collections import Counter

import numpy as np

BOOTSTRAP = dict(resamples=1000, seed=0)
LC_RIDGE = 1e-4  # penalty on the length slope: keeps the fit finite when the verdicts are separated by length


def best_worst_pair(samples, min_gap=0.0):
    """The highest- and lowest-scored of one prompt's samples, or None when their gap is below min_gap.

    Args:
        samples: list of dicts with at least "response" and "score" (already filtered, e.g. no empty ones).
        min_gap: keep the pair only if best score - worst score >= min_gap (and always > 0: equal scores
            say nothing about which answer is better).
    Returns:
        (best, worst) sample dicts, or None.
    """
    if len(samples) < 2:
        return None
    best = max(samples, key=lambda s: s["score"])
    worst = min(samples, key=lambda s: s["score"])
    gap = best["score"] - worst["score"]
    if gap <= 0 or gap < min_gap:
        return None
    return best, worst


def text_similarity(a, b):
    """Cosine similarity of the two texts' word counts (words: lowercased runs of letters, digits and _): 1.0 for
    the same words in the same numbers, 0.0 for no word in common (or an empty text). Cheap, and enough to spot a
    near-duplicate pair."""
    ca, cb = (Counter(re.findall(r"\w+", t.lower())) for t in (a, b))
    dot = sum(n * cb[w] for w, n in ca.items())
    norm = math.sqrt(sum(n * n for n in ca.values()) * sum(n * n for n in cb.values()))
    return dot / norm if norm else 0.0


def wilson_interval(wins, n, z=1.959964):
    """Wilson score interval for a binomial proportion wins/n (better than p ± z·se for small n or p near 0/1)."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at wins = 0 or n an exact end is p itself (0 or 1); rounding must not put it outside [0, 1] or past p
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def win_rate(scores_a, scores_b, tie_eps=0.0):
    """A's win rate over B on paired scores: wins / (wins + losses); ties (|a - b| <= tie_eps) counted apart.

    Returns a dict: wins, losses, ties, n (prompts), win_rate, ci95 (Wilson, over wins + losses), mean rewards,
    and margin_weighted_win_rate = sum of A's winning margins / sum of all |margins| (ties excluded). A value with
    nothing to average (no decided prompt, no prompt) is None: JSON null, never NaN.
    """
    assert len(scores_a) == len(scores_b), "one score of each model per prompt"
    assert all(math.isfinite(s) for s in [*scores_a, *scores_b]), "non-finite score: not a verdict"
    diffs = [a - b for a, b in zip(scores_a, scores_b)]
    wins = sum(d > tie_eps for d in diffs)
    losses = sum(d < -tie_eps for d in diffs)
    ties = len(diffs) - wins - losses
    decided = wins + losses
    total_margin = sum(abs(d) for d in diffs if abs(d) > tie_eps)
    low, high = wilson_interval(wins, decided)
    n = len(diffs)
    return dict(wins=wins, losses=losses, ties=ties, n=n,
                win_rate=wins / decided if decided else None, ci95=[low, high],
                mean_reward_a=sum(scores_a) / n if n else None,
                mean_reward_b=sum(scores_b) / n if n else None,
                margin_weighted_win_rate=sum(d for d in diffs if d > tie_eps) / total_margin if total_margin else None)


# -----------------------------------------------------------------------------
# length: what each side wrote, and the win rate at equal length

def answer_lengths(texts, tokens, finished):
    """One side's answers: mean and median length in tokens, the share of empty answers (nothing but whitespace)
    and the share cut at --max-new-tokens (finished False; None where the endings are unknown: finished None).
    Values are None when there is no answer."""
    n = len(texts)
    known = None not in finished
    return dict(mean_tokens=sum(tokens) / n if n else None,
                median_tokens=float(statistics.median(tokens)) if n else None,
                empty_share=sum(not t.strip() for t in texts) / n if n else None,
                truncated_share=sum(not f for f in finished) / n if n and known else None)


def pair_lengths(chosen_tokens, rejected_tokens):
    """Lengths of preference pairs: mean chosen and rejected length, the share of pairs whose chosen answer is
    longer, and the median of chosen - rejected (None values when there is no pair). Pairs whose chosen side is
    systematically longer teach a policy that longer is better."""
    n = len(chosen_tokens)
    if not n:
        return dict(mean_chosen_tokens=None, mean_rejected_tokens=None, chosen_longer_share=None,
                    median_delta_tokens=None)
    return dict(mean_chosen_tokens=sum(chosen_tokens) / n, mean_rejected_tokens=sum(rejected_tokens) / n,
                chosen_longer_share=sum(c > r for c, r in zip(chosen_tokens, rejected_tokens)) / n,
                median_delta_tokens=float(statistics.median(c - r for c, r in zip(chosen_tokens, rejected_tokens))))


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _lc_fit(delta, won, counts, ridge=LC_RIDGE, max_iter=100):
    """Length-controlled win rates, one per row of counts (how often each decided prompt is drawn).

    The AlpacaEval 2.0 length-controlled model (Dubois et al. 2024, arXiv 2404.04475; tatsu-lab/alpaca_eval
    metrics/glm_winrate.py): P(A wins) = sigmoid(a + b tanh(dlen / sd(dlen))), fitted by maximum likelihood; the
    rate at equal length is sigmoid(a). Kept from theirs: tanh of the length difference over its sample sd (ddof 1),
    the prediction at dlen = 0. Different: dlen is in tokens (theirs: characters) and its sd is over the decided
    prompts; ties are left out (theirs counts a tie as half a win); no instruction-difficulty term (we have no such
    covariate, so their mean over instructions is sigmoid(a) here); no regularisation towards gamed baselines and
    no cross-validated L1 penalty, only a tiny ridge on b. Degenerate cases, where the length term is undefined or
    the maximum likelihood lies at infinity, give the raw rate, the limit of the maximum-likelihood fit: every
    decided prompt won (or lost), fewer than two decided prompts, or one length difference for all (sd 0). Where
    wins and losses are separated by length, the ridge keeps b finite (a stays finite: its score equation says
    mean fitted probability = raw rate); the rate at equal length is then weakly determined: read the interval.

    Args:
        delta: [K] tokens_a - tokens_b of the decided prompts (or of distinct (delta, verdict) cells).
        won: [K] True where A won.
        counts: [B, K] non-negative weights, e.g. bootstrap draws.
    Returns:
        lc, intercept, slope, sd: arrays [B]. lc is nan for a row without decided prompts; intercept, slope and sd
        are nan where no model was fitted (lc is then the raw rate).
    """
    d, y, w = np.asarray(delta, float), np.asarray(won, float), np.asarray(counts, float)
    n, wins = w.sum(1), w @ y
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = wins / n
        sd = np.sqrt((w * (d - (w @ d / n)[:, None]) ** 2).sum(1) / (n - 1))
    lc, a_out, b_out, sd_out = raw.copy(), *np.full((3, len(n)), np.nan)
    fit = (wins > 0) & (wins < n) & (n >= 2) & (sd > 0)
    if not fit.any():
        return lc, a_out, b_out, sd_out
    x, w = np.tanh(d / sd[fit, None]), w[fit]                            # [F, K]
    a, b = np.log(raw[fit] / (1 - raw[fit])), np.zeros(fit.sum())         # start: no length effect

    def objective(a, b):  # penalised log-likelihood of each row
        z = a[:, None] + b[:, None] * x
        return (w * (y * z - np.logaddexp(0.0, z))).sum(1) - ridge * b * b / 2

    for _ in range(max_iter):  # Newton's method, step halved while it lowers the objective
        p = _sigmoid(a[:, None] + b[:, None] * x)
        r, h = w * (y - p), w * p * (1 - p)
        g_a, g_b = r.sum(1), (r * x).sum(1) - ridge * b
        h_aa, h_ab, h_bb = h.sum(1), (h * x).sum(1), (h * x * x).sum(1) + ridge
        det = h_aa * h_bb - h_ab ** 2
        step_a, step_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
        before, t = objective(a, b), np.ones_like(a)
        for _ in range(30):
            worse = objective(a + t * step_a, b + t * step_b) < before - 1e-12 * (1 + np.abs(before))  # rounding
            if not worse.any():
                break
            t[worse] /= 2
        a, b = a + t * step_a, b + t * step_b
        if max(np.abs(t * step_a).max(), np.abs(t * step_b).max()) < 1e-10:
            break
    lc[fit], a_out[fit], b_out[fit], sd_out[fit] = _sigmoid(a), a, b, sd[fit]
    return lc, a_out, b_out, sd_out


def _percentile_interval(values):
    values = values[~np.isnan(values)]  # resamples that drew no decided prompt have no rate
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else None


def length_controlled(verdicts, delta_tokens, resamples=BOOTSTRAP["resamples"], seed=BOOTSTRAP["seed"]):
    """The length-controlled win rate of A over B (see _lc_fit) and paired bootstrap 95% intervals of it and of
    the raw win rate.

    The bootstrap resamples prompts (ties included: the prompt is the unit) with replacement, `resamples` times
    from a fixed seed, and refits on each; the interval is the 2.5th and 97.5th percentile. A resample of n
    prompts is drawn as multinomial counts over the distinct (delta, verdict) cells, the same distribution as
    drawing n prompts, at a cost that does not grow with n. A resample without a decided prompt is left out.

    Args:
        verdicts: "a", "b" or "tie" per judged prompt (no skipped ones).
        delta_tokens: tokens_a - tokens_b per prompt.
    Returns:
        dict: lc_win_rate, lc_ci95, bootstrap_ci95 (the raw rate's), length_model ({intercept, slope,
        sd_delta_tokens}: None where no model was fitted), bootstrap ({resamples, seed}). Where no prompt is
        decided, every value but bootstrap is None (JSON null).
    """
    assert len(verdicts) == len(delta_tokens) and set(verdicts) <= {"a", "b", "tie"}
    cells, sizes = np.unique(np.array([[d, {"b": 0, "a": 1, "tie": 2}[v]] for v, d in zip(verdicts, delta_tokens)],
                                      dtype=float).reshape(-1, 2), axis=0, return_counts=True)
    decided = cells[:, 1] < 2
    delta, won = cells[decided, 0], cells[decided, 1] == 1
    lc, a, b, sd = (float(v[0]) for v in _lc_fit(delta, won, sizes[None, decided]))
    result = dict(lc_win_rate=None if math.isnan(lc) else lc, lc_ci95=None, bootstrap_ci95=None,
                  length_model=None if math.isnan(a) else dict(intercept=a, slope=b, sd_delta_tokens=sd),
                  bootstrap=dict(resamples=resamples, seed=seed))
    if decided.any():
        counts = np.random.default_rng(seed).multinomial(sizes.sum(), sizes / sizes.sum(), size=resamples)
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = counts[:, decided] @ won / counts[:, decided].sum(1)
        result["bootstrap_ci95"] = _percentile_interval(raw)
        chunks = -(-resamples * len(delta) // 1_000_000)  # about 8 MB per [resamples, cells] array at a time
        result["lc_ci95"] = _percentile_interval(np.concatenate(
            [_lc_fit(delta, won, part)[0] for part in np.array_split(counts[:, decided], chunks)]))
    return result
