"""Build a documentation-QA retrieval set (BEIR layout) from four FAQ documents, for EVALUATION ONLY.

The FAQ documents (the Python FAQ, perlfaq1-9, the Debian FAQ, gitfaq) are reserved for
evaluation: never train on this set, never commit it. Each FAQ entry gives one query (the
question heading) and one corpus passage (its answer, markup stripped, cut at 1500 characters);
qrels pair them. It approximates the held-out "real questions answered by documentation
passages" benchmark (there: BM25 nDCG@10 0.469, all-MiniLM-L6-v2 0.743; on this set 0.531 and
0.802 with 621 questions), so it is a relative yardstick, not the benchmark itself.

    mkdir -p /tmp/faqx/deb && cd /tmp/faqx/deb && apt-get download python3.11-doc perl-doc debian-faq git-doc
    for d in *.deb; do dpkg-deb -x "$d" /tmp/faqx/x/"${d%%_*}"; done
    python scripts/build_faq_eval.py /tmp/faqx runs/faqeval
    nvembed eval models/nvembed-debian-small --beir runs/faqeval
    nvembed eval bm25 --beir runs/faqeval

EXTRACT_ROOT holds x/python3.11-doc, x/perl-doc, x/debian-faq, x/git-doc (dpkg-deb -x output).
"""
import glob
import html
import json
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

MAXC, MINC = 1500, 40
WS = re.compile(r"\s+")

def norm(s):
    return WS.sub(" ", s).strip()

def trunc(s, n=MAXC):
    if len(s) <= n:
        return s
    cut = s[:n]
    sp = cut.rfind(" ")
    return (cut[:sp] if sp > n * 0.8 else cut).rstrip()

class Seg(HTMLParser):
    """Splits HTML into [(heading_level, heading_text, body_text)] at h1..h6."""
    SKIP_CLASSES = {"contents", "headerlink", "toc", "navheader", "navfooter"}
    BLOCK = {"p", "div", "li", "pre", "br", "tr", "dt", "dd", "table", "ul", "ol", "blockquote", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.segs = []  # [level, heading parts, body parts]
        self.cur = None
        self.in_h = None
        self.skip = []  # stack of tag names being skipped, with depth counting
        self.skip_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        if self.skip_depth:
            if tag == self.skip[-1]:
                self.skip_depth += 1
            return
        if cls & self.SKIP_CLASSES or tag in ("script", "style"):
            self.skip.append(tag)
            self.skip_depth = 1
            return
        if re.fullmatch(r"h[1-6]", tag):
            self.cur = [int(tag[1]), [], []]
            self.segs.append(self.cur)
            self.in_h = tag
            return
        if tag in self.BLOCK and self.cur is not None and not self.in_h:
            self.cur[2].append(" ")

    def handle_endtag(self, tag):
        if self.skip_depth:
            if tag == self.skip[-1]:
                self.skip_depth -= 1
                if not self.skip_depth:
                    self.skip.pop()
            return
        if tag == self.in_h:
            self.in_h = None
        elif tag in self.BLOCK and self.cur is not None:
            self.cur[2].append(" ")

    def handle_data(self, data):
        if self.skip_depth or self.cur is None:
            return
        self.cur[1 if self.in_h else 2].append(data)

def html_segments(text):
    p = Seg()
    p.feed(text)
    p.close()
    return [(lvl, norm("".join(h)), norm("".join(b))) for lvl, h, b in p.segs]

def python_faq(root):
    out = []
    for f in sorted(glob.glob(f"{root}/x/python3.11-doc/usr/share/doc/python3.11/html/faq/*.html")):
        if f.endswith("index.html"):
            continue
        s = Path(f).read_text(encoding="utf-8")
        s = s[s.index('<div class="body" role="main">'):s.index('<div class="sphinxsidebar"')]
        for lvl, h, b in html_segments(s):
            if lvl >= 2:
                out.append((h.rstrip("¶").strip(), b))
    return out

def debian_faq(root):
    out = []
    d = f"{root}/x/debian-faq/usr/share/doc/debian/FAQ"
    for f in sorted(glob.glob(f"{d}/*.en.html")):
        if os.path.basename(f) == "index.en.html":
            continue
        s = Path(f).read_text(encoding="utf-8")
        for lvl, h, b in html_segments(s):
            if lvl >= 2:
                h = re.sub(r"^\d+(\.\d+)*\.\s*", "", h)  # section numbers "7.1. "
                out.append((h, b))
    return out

POD_CODE = re.compile(r"([A-Z])<<+\s(.*?)\s>>+|([A-Z])<([^<>]*)>", re.S)
POD_ESC = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}

def pod_text(s):
    prev = None
    while prev != s:  # innermost first, repeat for nesting
        prev = s
        def rep(m):
            code, body = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            if code == "E":
                return POD_ESC.get(body, html.unescape(f"&{body};") if not body.isdigit() else chr(int(body)))
            if code == "L":
                body = body.split("|", 1)[0] if "|" in body else body
                return body.replace('"', "").replace("/", " ") if "://" not in body else body
            if code in ("X", "Z"):
                return ""
            return body
        s = POD_CODE.sub(rep, s)
    return s

def perl_faq(root):
    out = []
    for i in range(1, 10):
        f = glob.glob(f"{root}/x/perl-doc/usr/share/perl/*/pod/perlfaq{i}.pod")[0]
        paras = re.split(r"\n\s*\n", Path(f).read_text(encoding="utf-8"))
        cur = None
        for p in paras:
            st = p.lstrip("\n")
            if st.startswith("=head2"):
                cur = [pod_text(st[6:].strip()), []]
                out.append(cur)
            elif st.startswith("=head1"):
                cur = None
            elif cur is not None:
                if st.startswith("=item"):
                    cur[1].append(pod_text(st[5:]))
                elif st.startswith("="):  # =over/=back/=begin/=end/=for/=cut
                    continue
                else:
                    cur[1].append(pod_text(p))
    out = [(h, b) if not b else (h, [re.sub(r"^\s*\(contributed by [^)]*\)\s*", "", b[0])] + b[1:]) for h, b in out]
    return [(norm(h), norm(" ".join(b))) for h, b in out]

def git_faq(root):
    s = Path(glob.glob(f"{root}/x/git-doc/usr/share/doc/git-doc/gitfaq.txt")[0]).read_text(encoding="utf-8")
    s = s.split("\nSEE ALSO\n")[0]
    out = []
    for blk in re.split(r"\n\[\[[\w-]+\]\]\n", s)[1:]:
        q, _, a = blk.partition("::\n")
        a = re.split(r"\n[^\n]+\n-{3,}\n", a)[0]  # stop at next section title
        a = re.sub(r"^\+$|^-{4}$", " ", a, flags=re.M)
        a = re.sub(r"linkgit:([\w-]+)\[(\d)\]", r"\1(\2)", a)
        a = a.replace("`", "")
        out.append((norm(q.replace("`", "")), norm(a)))
    return out

QWORDS = re.compile(r"^(how|what|why|where|when|which|who|whom|whose|can|could|is|are|am|was|were|do|does|did|should|shall|will|would|may|must|has|have|i|my)\b", re.I)

def is_question(h):
    return "?" in h or bool(QWORDS.match(h))

def main():
    root, outd = sys.argv[1], sys.argv[2]
    os.makedirs(outd, exist_ok=True)
    sources = [("python-faq", python_faq), ("perlfaq", perl_faq), ("debfaq", debian_faq), ("gitfaq", git_faq)]
    corpus, queries, qrels, stats = [], [], [], {}
    seen_q, seen_d = set(), set()
    for prefix, fn in sources:
        pairs = fn(root)
        n_raw, dropped = len(pairs), {"short": 0, "notq": 0, "dup": 0}
        k = 0
        for q, a in pairs:
            if len(a) < MINC:
                dropped["short"] += 1
                continue
            if not is_question(q):
                dropped["notq"] += 1
                continue
            a = trunc(a)
            if q.lower() in seen_q or a in seen_d:
                dropped["dup"] += 1
                continue
            seen_q.add(q.lower())
            seen_d.add(a)
            k += 1
            i = f"{prefix}-{k:04d}"
            corpus.append({"_id": i, "title": "", "text": a})
            queries.append({"_id": i, "text": q})
            qrels.append((i, i))
        stats[prefix] = {"headings": n_raw, "kept": k, **dropped}
    with open(f"{outd}/corpus.jsonl", "w") as f:
        for d in corpus:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(f"{outd}/queries.jsonl", "w") as f:
        for d in queries:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(f"{outd}/qrels.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d in qrels:
            f.write(f"{q}\t{d}\t1\n")
    with open(f"{outd}/instruction.txt", "w") as f:
        f.write("Given a question, retrieve documentation passages that answer the question\n")
    print(json.dumps(stats, indent=1))
    print("total", len(queries))

if __name__ == "__main__":
    main()
