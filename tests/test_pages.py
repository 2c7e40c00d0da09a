"""The HTML pages opened as a person opens them: in a real headless Chromium, from disk, with the filters driven
through the URL. The DOM after the page's script has run (--dump-dom) is parsed and checked: every prompt is
there, a filter shows exactly what it should, search and sorting work, text with markup from a model stays text,
and nothing is fetched. Without chromium these tests skip, except in CI (CI set), where they fail."""
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanoalign import pages
from nanoalign.jsonl import write_json, write_jsonl
from nanoalign.preferences import win_rate
from tests.fixtures import serving


def chromium():
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs these tests")
    return path


def browse(tmp_path, page, fragment="", screenshot=None, size="1400,1800"):
    """Open file://page#fragment in a fresh headless Chromium; the DOM after its script ran (or the screenshot)."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}",
           "--virtual-time-budget=5000"]
    cmd += [f"--window-size={size}", "--hide-scrollbars", f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run(cmd + [page.resolve().as_uri() + (f"#{fragment}" if fragment else "")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Dom(proc.stdout)


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag=None, **attrs):
        """Descendant elements with this tag (any when None) and these attribute values, in document order."""
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and all(c.attrs.get(k.rstrip("_")) == v for k, v in attrs.items()):
                    yield c
                yield from c.all(tag, **attrs)


class Dom(HTMLParser):
    """The dumped DOM as a small tree (html.parser: no dependency)."""
    VOID = {"meta", "link", "br", "img", "input", "hr", "source", "col", "area", "base", "embed", "wbr", "track"}

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.source = text
        self.root = self.node = Node("#root", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in self.VOID:
            self.node = node

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)

    def by_id(self, id_):
        return next(self.root.all(id=id_), None)

    def articles(self):
        return list(self.root.all("article"))


# -----------------------------------------------------------------------------
# An eval dir like eval_winrate.py leaves, with markup in every text a model or a data file supplies

INJECT = ("<script>document.title='pwned-script'</script></script><script>document.title='pwned-close'</script>"
          "<img id=pwned-img src=x onerror=\"document.title='pwned-onerror'\"><b id=pwned-b>bold</b>"
          "<!-- comment & \u2028 line separator -->")
N = 40


def verdict_of(i):
    return "skipped" if i % 10 == 7 else "tie" if i % 10 == 3 else "a" if i % 3 else "b"


def eval_dir(root, n=N, answer_words=4, beacon=""):
    """n prompts; prompt 5 and its answers carry INJECT (and an <img> pointing at `beacon`); prompts 6, 12, 14, 22, 30
    contain the word Zebra (B wins 6, 12 and 30). Margins and lengths are distinct, so every sort order is unique."""
    rows = []
    for i in range(n):
        w = verdict_of(i)
        margin = {"a": 0.1 + 0.013 * i, "b": -0.1 - 0.017 * i, "tie": 0.0, "skipped": None}[w]
        ta, tb = 10 + (7 * i) % 41, 12 + (5 * i) % 37  # distinct differences: 7i - 5i mod 41/37 never repeats here
        extra = f" {INJECT}<img src=\"{beacon}\">" if i == 5 else " Zebra crossing" if i in (6, 12, 14, 22, 30) else ""
        rows.append(dict(prompt_id=f"p{i:03d}" + (INJECT if i == 5 else ""),
                         prompt=[{"role": "user", "content": f"Question {i}?{extra}"}],
                         response_a=f"answer a{i} " * answer_words + extra, response_b=f"answer b{i} " * answer_words,
                         score_a=None if w == "skipped" else 1.0 + margin, score_b=1.0, winner=w,
                         tokens_a=ta, tokens_b=tb, finished_a=True, finished_b=i % 4 != 0))
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "per_prompt.jsonl", rows)
    scored = [r for r in rows if r["winner"] != "skipped"]
    summary = dict(name_a="dpo" + ("<i id=pwned-name>x</i>" if beacon else ""), name_b="sft", reward="toy",
                   interval="wilson", **win_rate([r["score_a"] for r in scored], [r["score_b"] for r in scored]),
                   skipped=n - len(scored), sampling=dict(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=64, seed=0),
                   bootstrap_ci95=[0.41, 0.79], lc_win_rate=0.5432, lc_ci95=[0.3811, 0.7012],
                   length_model=dict(intercept=0.1737, slope=0.9, sd_delta_tokens=12.5),
                   bootstrap=dict(resamples=1000, seed=0),
                   lengths=dict(a=dict(mean_tokens=30.25, median_tokens=29.0, empty_share=0.0, truncated_share=0.125),
                                b=dict(mean_tokens=28.0, median_tokens=27.5, empty_share=0.025, truncated_share=None)))
    write_json(root / "summary.json", summary)
    write_json(root / "run_settings.json", {"--model-a": "runs/sft/final", "--adapter-a": ["runs/dpo/final"],
                                            "--model-b": "runs/sft/final", "--prompts": f"data/{INJECT}.jsonl"})
    return rows


def ids(dom):
    return [a.attrs["data-id"] for a in dom.articles()]


@pytest.fixture
def beacon():
    """A real HTTP server on 127.0.0.1 that records every request: a page that fetches anything is caught."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url.removesuffix("/v1") + "/leak.png", hits


def test_script_json_is_inert_and_round_trips():
    value = {"t": "</script><script>x()</script><!-- a & b \u2028\u2029 caf\u00e9 \U0001f600", "n": [1, None, 2.5]}
    text = pages.script_json(value)
    assert json.loads(text) == value
    assert text.isascii() and not set("<>&") & set(text)
    assert "\\u003c/script\\u003e" in text and "\\u2028" in text
    with pytest.raises(ValueError):  # NaN is not JSON: the page's rows hold null instead (pages.finite)
        pages.script_json(float("nan"))


def test_length_bins_keep_equal_values_together():
    # a run of equal values goes to the quantile its middle falls in: 105 at -15 (middle 52.5 of 1005: bin 0 of 8),
    # 900 at 0 (middle 555: bin 4); 0..9 in 3 bins by the middles 0.5..9.5 (bins start at 10/3 and 20/3)
    bins = pages.equal_count_bins([(-15, 1)] * 105 + [(0, 0)] * 900, 8)
    assert [(len(b), b[0][0]) for b in bins] == [(105, -15), (900, 0)]
    assert [[v for v, _ in b] for b in pages.equal_count_bins([(i, 0) for i in range(10)], 3)] == \
        [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]


def test_eval_report_shows_every_prompt_and_runs_no_injected_markup(tmp_path, beacon):
    url, hits = beacon
    rows = eval_dir(tmp_path / "eval", beacon=url)
    page = pages.write_eval_report(tmp_path / "eval")
    source = page.read_text()
    assert source.isascii()
    assert "default-src 'none'" in source and not re.search(r"(src|href)\s*=\s*[\"']?https?:", source)
    dom = browse(tmp_path, page)
    # every prompt, in file order, with its verdict; all N fit in the first 100
    assert ids(dom) == [r["prompt_id"] for r in rows]
    assert [a.attrs["data-verdict"] for a in dom.articles()] == [r["winner"] for r in rows]
    assert dom.by_id("count").text() == f"showing {N} of {N} matching ({N} in all)"
    assert dom.by_id("more").attrs.get("hidden") is not None
    # the injected markup is on screen as text, and none of it became an element or ran
    injected = dom.articles()[5]
    assert injected.text().count(INJECT) == 3  # the prompt id in the header, the prompt, answer A
    assert dom.root.all("title").__next__().text() == "dpo<i id=pwned-name>x</i> vs sft: nanoalign eval"
    assert not [e for e in dom.root.all() if e.attrs.get("id", "").startswith("pwned")]
    assert [s.attrs.get("type") for s in dom.root.all("script")] == ["application/json", None]
    assert len(list(dom.root.all("img"))) == 0
    assert hits == []  # the <img src=http://127.0.0.1/...> in the data fetched nothing
    # a card: header, both sides with score, length and ending
    card = dom.articles()[0]  # p000: i = 0, B wins (i % 3 == 0), margin -0.1, ta 10, tb 12, B cut
    head = [s.text() for s in card.all("span")]
    assert head == ["#1", "p000", "sft wins", "margin -0.100", "\u0394 -2 tokens"]
    assert [h.text() for h in card.all("h4")] == ["dpo<i id=pwned-name>x</i> \u00b7 score 0.900 \u00b7 10 tokens \u00b7 finished",
                                                  "sft \u00b7 score 1.000 \u00b7 12 tokens \u00b7 cut at max tokens"]
    assert [s.attrs["class"] for s in card.all("section")] == ["side lost", "side won"]
    # the headline, from summary.json
    text = dom.root.text()
    for shown in ("0.543", "[0.381, 0.701]", "[0.410, 0.790]", "30.2", "12.5%", "2.5%", "runs/sft/final + adapter runs/dpo/final"):
        assert shown in text, shown
    assert int(dom.by_id("render-ms").text()) > 0


@pytest.mark.parametrize("fragment, expect", [
    # losses that mention zebra (any case), smallest margin first: p030, p012, p006
    ("verdict=loss&q=zebra&sort=margin&dir=asc",
     lambda rows: sorted((r for r in rows if r["winner"] == "b" and "zebra" in json.dumps(r).lower()),
                         key=lambda r: r["score_a"] - r["score_b"])),
    # A's wins by length difference, largest first
    ("verdict=win&sort=dlen", lambda rows: sorted((r for r in rows if r["winner"] == "a"),
                                                  key=lambda r: r["tokens_b"] - r["tokens_a"])),
    ("verdict=tie&sort=len_a&dir=asc", lambda rows: sorted((r for r in rows if r["winner"] == "tie"),
                                                           key=lambda r: r["tokens_a"])),
])
def test_eval_report_filters_search_and_sorts_from_the_url(tmp_path, fragment, expect):
    rows = eval_dir(tmp_path / "eval")
    dom = browse(tmp_path, pages.write_eval_report(tmp_path / "eval"), fragment)
    wanted = [r["prompt_id"] for r in expect(rows)]
    assert wanted
    assert ids(dom) == wanted
    assert dom.by_id("count").text() == f"showing {len(wanted)} of {len(wanted)} matching ({N} in all)"
    # the controls show the state read from the URL
    on = [b.attrs["data-value"] for b in dom.root.all("button") if "on" in b.attrs.get("class", "").split()]
    assert on == [dict(p.split("=") for p in fragment.split("&")).get("verdict", "all")]


def test_eval_report_renders_5000_prompts_in_pages(tmp_path):
    rows = eval_dir(tmp_path / "eval", n=5000)
    page = pages.write_eval_report(tmp_path / "eval")
    dom = browse(tmp_path, page, "verdict=skipped&q=QUESTION")  # every prompt says "Question i?"
    skipped = [r["prompt_id"] for r in rows if r["winner"] == "skipped"]
    assert ids(dom) == skipped[:pages.PAGE_ROWS]
    assert dom.by_id("count").text() == "showing 100 of 500 matching (5000 in all)"
    assert dom.by_id("more").attrs.get("hidden") is None


def test_eval_report_of_an_older_run_says_na(tmp_path):
    # a run from before lengths were recorded: no tokens_*/finished_* per prompt, no LC fields in summary.json
    rows = [dict(prompt_id=f"p{i}", prompt=[{"role": "user", "content": "q"}], response_a="a" * (i + 1),
                 response_b="bb", score_a=float(i), score_b=1.0, winner="a" if i > 1 else "b" if i < 1 else "tie")
            for i in range(3)]
    write_jsonl(tmp_path / "per_prompt.jsonl", rows)
    write_json(tmp_path / "summary.json", dict(name_a="A", name_b="B", reward="toy", interval="wilson",
                                               **win_rate([r["score_a"] for r in rows], [1.0] * 3), skipped=0))
    source = pages.write_eval_report(tmp_path).read_text()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', source).group(1))
    assert data["unit"] == "chars" and [(r["ta"], r["tb"], r["fa"]) for r in data["rows"]] == [(1, 2, None), (2, 2, None),
                                                                                                (3, 2, None)]
    lc_card = source.split("length-controlled win rate", 1)[1].split("</div></div>", 1)[0]
    assert '<div class="big">n/a</div>' in lc_card and "bootstrap 95% n/a" in lc_card


def synthetic_dir(root):
    """gen_synthetic.py's files: 4 prompts x 3 samples; pairs for 3 of them (prompt g2 fell below the gap)."""
    samples, pairs = [], []
    for i in range(4):
        prompt = [{"role": "user", "content": f"Prompt {i}" + (f" {INJECT}" if i == 1 else "")}]
        group = [dict(prompt_id=f"g{i}", prompt=prompt, sample=k, response=f"sample {i}.{k} " + "word " * (3 * k + i),
                      score=[0.2, 0.9, 0.5][k] + 0.1 * i, n_tokens=3 * k + i + 3, finished=k != 2) for k in range(3)]
        samples += group
        if i != 2:
            best, worst = group[1], group[0] if i != 3 else group[2]
            pairs.append(dict(prompt_id=f"g{i}", prompt=prompt, chosen=best["response"], rejected=worst["response"],
                              score_chosen=best["score"], score_rejected=worst["score"],
                              chosen_finished=best["finished"], rejected_finished=worst["finished"],
                              **({"chosen_tokens": best["n_tokens"] - best["finished"],  # the stop token left out
                                  "rejected_tokens": worst["n_tokens"] - worst["finished"]} if i else {})))
    root.mkdir(parents=True)
    write_jsonl(root / "samples.jsonl", samples)
    write_jsonl(root / "pairs.jsonl", pairs)
    write_json(root / "summary.json", dict(prompts=4, samples=12, pairs=3, prompts_below_gap=1, skipped=0,
                                           mean_score=0.65, truncated=4, empty=0,
                                           pair_lengths=dict(mean_chosen_tokens=6.0, mean_rejected_tokens=5.0,
                                                             chosen_longer_share=2 / 3, median_delta_tokens=3.0)))
    return pairs


def test_pairs_report_shows_each_pair_with_the_other_samples(tmp_path):
    synthetic_dir(tmp_path / "synth")
    page = pages.write_pairs_report(tmp_path / "synth")
    dom = browse(tmp_path, page, "sort=gap")
    # gaps: g0 0.7, g1 0.7, g3 0.4 (chosen 1.2 vs rejected 0.8): largest first, ties in file order
    assert ids(dom) == ["g0", "g1", "g3"]
    g0, g1, g3 = dom.articles()
    # lengths: from the pair's own fields, or (g0, written before they existed) from its samples' n_tokens less the
    # stop token of a finished answer (6 - 1 and 3 - 1)
    assert [h.text() for h in g0.all("h4")][:2] == ["chosen \u00b7 score 0.900 \u00b7 5 tokens \u00b7 finished",
                                                    "rejected \u00b7 score 0.200 \u00b7 2 tokens \u00b7 finished"]
    assert [s.text() for s in g3.all("span")][-1] == "\u0394 -4 tokens (chosen \u2212 rejected)"  # 9 - 1 vs 12, cut
    # the third sample of each prompt, the one in no pair, with its score
    for card, (i, k, about) in zip((g0, g1, g3), ((0, 2, "0.500 \u00b7 9 tokens \u00b7 cut at max tokens"),
                                                  (1, 2, "0.600 \u00b7 10 tokens \u00b7 cut at max tokens"),
                                                  (3, 0, "0.500 \u00b7 5 tokens \u00b7 finished"))):
        others = next(card.all("details"))
        assert others.text().startswith(f"1 other sample of this prompt (scores {about[:4]})")
        assert f"sample {i}.{k} " in others.text() and [h.text() for h in others.all("h4")] == [f"score {about}"]
    assert g1.text().count(INJECT) == 1 and not [e for e in dom.root.all() if e.attrs.get("id", "").startswith("pwned")]
    text = dom.root.text()
    assert "prompts below gap: 1" in text and "chosen longer in 66.7% of pairs" in text
    assert dom.by_id("count").text() == "showing 3 of 3 matching (3 in all)"
    dom = browse(tmp_path, page, "longer=rejected")
    assert ids(dom) == ["g3"]


def test_compare_page_links_each_report(tmp_path, capsys):
    for name in ("eval_one", "eval two"):
        eval_dir(tmp_path / "runs" / name)
    pages.write_eval_report(tmp_path / "runs/eval_one")
    (tmp_path / "runs/eval_one/report.html").write_text("kept")  # an existing report is linked, not rewritten
    pages.main([str(tmp_path / "runs/eval_one"), str(tmp_path / "runs/eval two"), "--out", str(tmp_path / "site/compare.html")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "site/compare.html")
    assert (tmp_path / "runs/eval_one/report.html").read_text() == "kept"
    assert (tmp_path / "runs/eval two/report.html").read_text().startswith("<!DOCTYPE html>")  # written: it was missing
    dom = browse(tmp_path, tmp_path / "site/compare.html")
    table = dom.by_id("compare")
    links = [a.attrs["href"] for a in table.all("a")]
    assert links == ["../runs/eval_one/report.html", "../runs/eval%20two/report.html"]
    cells = [[td.text() for td in tr.all("td")] for tr in table.all("tr")][1:]
    # 21 wins, 11 losses, 4 ties, 4 skipped of 40 (verdict_of); mean margin of the 36 scored: 2.76 / 36 = 0.0767
    assert cells[0][1:] == ["36", "0.656", "[0.483, 0.796]", "[0.410, 0.790]", "0.543", "[0.381, 0.701]",
                            "21/11/4", "4", "30.2 / 28.0", "1.077 / 1.000"]
    assert cells[1][0] == "dpo vs sft"
    with pytest.raises(SystemExit, match="no summary.json"):
        pages.main([str(tmp_path / "site"), "--out", str(tmp_path / "x.html")])


def test_eval_report_screenshot(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    eval_dir(tmp_path / "eval", answer_words=60)
    browse(tmp_path, pages.write_eval_report(tmp_path / "eval"), screenshot=tmp_path / "shot.png", size="1200,1200")
    image = plt.imread(tmp_path / "shot.png")
    assert image.shape[:2] == (1200, 1200)
    win, loss = (tuple(int(pages.COLORS[k][i:i + 2], 16) / 255 for i in (1, 3, 5)) for k in ("a", "b"))
    for colour in (win, loss):  # the first cards' verdict badges and borders, below the charts, in colour
        assert (abs(image[..., :3] - colour).max(-1) < 0.02).sum() > 200
