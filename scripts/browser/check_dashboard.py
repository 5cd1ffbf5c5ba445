#!/usr/bin/env python3
"""Browser test for tallyd's live page (issue 6). Python stdlib only.

Given a running tallyd on a fresh database, it opens http://HOST:PORT/ in headless Chromium
(DevTools protocol over --remote-debugging-pipe, see cdp.py), sends a known mix of transactions
while the page polls, and checks that what the page holds (DOM text, data-* attributes, pixels of
a screenshot) matches what was sent and what /stats says. Finally it stops tallyd (SIGTERM to
--pid) and checks the page turns to 'disconnected'.

Prints one line per check and, last, `N passed, M failed`; exits 1 on any failure.
"""
import argparse, bisect, http.client, json, math, os, random, signal, sys, tempfile, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cdp  # noqa: E402

# Seed facts from docs/CONTRACT.md: demo card 1234567890 at 100000, and cards 4%015d n=1..100000 at
# 100000 + (n % 1000) * 100.
SEED_ACCOUNTS = 100001
SEED_SUM = 100000 + 100000 * 100000 + 100 * 100 * sum(range(1000))
COLORS = {"committed": (0x4c, 0xc3, 0x8a), "balance": (0x4c, 0xc3, 0x8a), "p99": (0xf0, 0x8c, 0x5a),
          "queue": (0xa7, 0x8b, 0xfa)}


class Results:
    def __init__(self):
        self.passed = self.failed = 0

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print("ok   - %s%s" % (name, (": " + detail) if detail else ""), flush=True)
        else:
            self.failed += 1
            print("FAIL - %s%s" % (name, (": " + detail) if detail else ""), flush=True)
        return ok


def get_json(base, path, timeout=5):
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return json.loads(r.read())


class Load:
    """Sends the planned transactions at a wavy rate over `duration` seconds from a few threads."""

    def __init__(self, host, port, plan, duration, threads=4):
        self.host, self.port, self.plan, self.duration, self.threads = host, port, plan, duration, threads
        self.lock = threading.Lock()
        self.next = 0
        self.codes = {}        # (kind, http status, error code or status) -> count
        self.deposited = 0     # sum of committed amounts
        self.unexpected = []
        # request i goes out at times[i]: rate(t) ~ 1 + 0.7 sin(2 pi t / 5), so the chart has a shape
        steps = 2000
        cum = [0.0]
        for k in range(1, steps + 1):
            t = duration * k / steps
            cum.append(cum[-1] + 1 + 0.7 * math.sin(2 * math.pi * t / 5.0))
        self.times = []
        for i in range(len(plan)):
            target = cum[-1] * i / len(plan)
            self.times.append(duration * bisect.bisect_left(cum, target) / steps)

    def worker(self, t0):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        while True:
            with self.lock:
                i = self.next
                self.next += 1
            if i >= len(self.plan):
                break
            delay = t0 + self.times[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            kind, card, amount, expect = self.plan[i]
            body = json.dumps({"card_number": card, "amount": amount})
            for attempt in range(3):
                try:
                    conn.request("POST", "/transaction", body, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    data = r.read()
                    break
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                    if attempt == 2:
                        raise
            try:
                j = json.loads(data)
            except ValueError:
                j = {}
            what = j.get("status") if r.status == 200 else (j.get("error") or {}).get("code")
            with self.lock:
                key = (kind, r.status, what)
                self.codes[key] = self.codes.get(key, 0) + 1
                if r.status == 200 and what == "committed":
                    self.deposited += amount
                if expect and (r.status, what) != expect:
                    self.unexpected.append((kind, card, amount, r.status, data[:200]))
        conn.close()

    def start(self):
        t0 = time.monotonic() + 0.05
        self.ts = [threading.Thread(target=self.worker, args=(t0,), daemon=True) for _ in range(self.threads)]
        for t in self.ts:
            t.start()

    def join(self, timeout):
        end = time.monotonic() + timeout
        for t in self.ts:
            t.join(max(0.1, end - time.monotonic()))
        return not any(t.is_alive() for t in self.ts)

    def count(self, status, what):
        return sum(v for (k, s, w), v in self.codes.items() if s == status and w == what)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--pid", type=int, help="tallyd's pid; stopped at the end to check 'disconnected'")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--deposits", type=int, default=1500)
    ap.add_argument("--withdrawals", type=int, default=150, help="insufficient-funds withdrawals")
    ap.add_argument("--unknown-cards", type=int, default=6)
    ap.add_argument("--duration", type=float, default=12.0, help="seconds over which to send them")
    ap.add_argument("--screenshot", help="where to write the 1280x900 screenshot")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=6)
    a = ap.parse_args()

    base = a.url.rstrip("/")
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    port = int(port)
    work = a.workdir or tempfile.mkdtemp(prefix="tallyd-browser-")
    res = Results()
    rnd = random.Random(a.seed)

    # ---- before: the server is fresh -----------------------------------------------------------
    s0 = get_json(base, "/stats")
    tx0 = s0["transactions"]
    res.check("server starts with no transactions", sum(tx0.values()) == 0, json.dumps(tx0))
    with urllib.request.urlopen(base + "/", timeout=5) as r:
        page = r.read().decode("utf-8", "replace")
        ctype = r.headers.get("Content-Type", "")
    res.check("GET / is text/html", ctype.startswith("text/html"), ctype)
    res.check("page is self-contained (no http(s):// or // sources)",
              not any(s in page for s in ('src="http', "src='http", 'href="http', 'src="//', "@import", "url(http")))

    # ---- plan: deposits to seed cards, withdrawals far beyond any balance, a few unknown cards --
    plan = []
    for _ in range(a.deposits):
        n = rnd.randint(1, 100000)
        plan.append(("deposit", "4%015d" % n, rnd.randint(1, 5000), (200, "committed")))
    for _ in range(a.withdrawals):
        card = "1234567890" if rnd.random() < 0.5 else "4%015d" % rnd.randint(1, 100000)
        plan.append(("withdrawal", card, -10 ** 12, (422, "insufficient_funds")))
    for k in range(a.unknown_cards):
        plan.append(("unknown-card", "4%015d" % (900000 + k), 100, None))  # 404 by the contract; tallied as answered
    rnd.shuffle(plan)

    # ---- browser ---------------------------------------------------------------------------------
    browser = cdp.Chromium(a.chromium, os.path.join(work, "profile"), 1280, 900, os.path.join(work, "chromium.log"))
    try:
        browser.open(base + "/")
        browser.wait_for("document.readyState === 'complete' && +document.body.dataset.polls >= 2", timeout=30)
        res.check("page polled /stats and /metrics and shows 'connected'",
                  browser.eval("document.body.dataset.status") == "connected"
                  and browser.eval("document.getElementById('status').textContent") == "connected")

        load = Load(host, port, plan, a.duration)
        t_load = time.monotonic()
        load.start()
        # while it flows: watch the committed rate shown, and take the screenshot near the end
        peak_shown = 0.0
        shot_at = t_load + max(1.0, a.duration - 1.5)
        shot = None
        while time.monotonic() < t_load + a.duration + 20 and any(t.is_alive() for t in load.ts):
            v = browser.eval("parseFloat(document.getElementById('chart-tps').dataset.last) || 0")
            peak_shown = max(peak_shown, v)
            if shot is None and time.monotonic() >= shot_at:
                shot = browser.screenshot()
            time.sleep(0.5)
        finished = load.join(30)
        load_secs = time.monotonic() - t_load
        res.check("load finished", finished, "%d requests in %.1fs" % (len(plan), load_secs))
        res.check("every deposit committed and every withdrawal got insufficient_funds", not load.unexpected,
                  "%d unexpected, first: %r" % (len(load.unexpected), load.unexpected[:1]) if load.unexpected else "")
        if shot is None:
            shot = browser.screenshot()

        # let the page take >= 2 more readings after the last answer
        polls = browser.eval("+document.body.dataset.polls")
        browser.wait_for("+document.body.dataset.polls >= %d" % (polls + 2), timeout=10)
        time.sleep(1.2)  # and one more per-second balance sample after the last deposit
        browser.wait_for("+document.body.dataset.polls >= %d" % (polls + 4), timeout=10)
        st = get_json(base, "/stats")
        dom = browser.eval("""(() => {
          const g = (id) => document.getElementById(id), d = (id) => Object.assign({}, g(id).dataset);
          const num = (id) => parseFloat(g(id).textContent.replace(/,/g, ''));
          const s = window.tallyd.state;
          return {
            committed: num('committed-total'), insufficient: num('insufficient-total'),
            notfound: num('card-not-found-total'), rejected: num('rejected-total'),
            queueDepth: num('queue-depth'), samples: num('samples'), avgText: g('avg-balance').textContent,
            avg: parseFloat(g('avg-balance').dataset.value), p99: parseFloat(g('p99-ms').dataset.value),
            p50: parseFloat(g('p50-ms').dataset.value), p99Text: g('p99-ms').textContent,
            tps: d('chart-tps'), lat: d('chart-latency'), queue: d('chart-queue'), bal: d('chart-balance'),
            status: document.body.dataset.status, polls: +document.body.dataset.polls,
            peakCommitted: Math.max(0, ...(s.tps.v.committed || []).filter(Number.isFinite)),
            rects: Object.fromEntries(['chart-tps', 'chart-latency', 'chart-queue', 'chart-balance'].map((id) => {
              const r = g(id).querySelector('canvas').getBoundingClientRect();
              return [id, {x: r.x, y: r.y, width: r.width, height: r.height}]; })),
          }; })()""")

        n_dep, n_wd = load.count(200, "committed"), load.count(422, "insufficient_funds")
        n_nf, n_rej = load.count(404, "card_not_found"), sum(v for (k, s, w), v in load.codes.items() if s == 400)
        print("# sent: %d committed, %d insufficient_funds, %d card_not_found, %d rejected; deposited %d"
              % (n_dep, n_wd, n_nf, n_rej, load.deposited), flush=True)
        print("# page: " + json.dumps({k: dom[k] for k in ("committed", "insufficient", "notfound", "samples", "avg", "p99", "polls")}), flush=True)

        # ---- totals --------------------------------------------------------------------------------
        res.check("#committed-total equals the deposits sent", dom["committed"] == a.deposits == n_dep,
                  "page %s, sent %d" % (dom["committed"], a.deposits))
        res.check("#insufficient-total equals the insufficient withdrawals sent", dom["insufficient"] == a.withdrawals == n_wd,
                  "page %s, sent %d" % (dom["insufficient"], a.withdrawals))
        res.check("#card-not-found-total and #rejected-total match the answers the unknown cards got",
                  dom["notfound"] == n_nf and dom["rejected"] == n_rej and n_nf + n_rej == a.unknown_cards,
                  "page %s/%s, answers %d x404 %d x400" % (dom["notfound"], dom["rejected"], n_nf, n_rej))
        res.check("page totals equal /stats", dom["committed"] == st["transactions"]["committed"]
                  and dom["insufficient"] == st["transactions"]["insufficient_funds"], json.dumps(st["transactions"]))

        # ---- transactions-per-second chart: its points add up to what was sent --------------------
        tps = dom["tps"]
        res.check("tps chart has a point per reading", int(tps["points"]) >= max(3, int(load_secs / 2)),
                  "data-points=%s over %.1fs" % (tps["points"], load_secs))
        res.check("tps chart: committed rate x interval, summed, equals deposits sent",
                  int(float(tps["seenCommitted"])) == a.deposits, "data-seen-committed=%s" % tps["seenCommitted"])
        res.check("tps chart: insufficient-funds rate x interval, summed, equals withdrawals sent",
                  int(float(tps["seenInsufficient"])) == a.withdrawals, "data-seen-insufficient=%s" % tps["seenInsufficient"])
        # the chart's peak can be no lower than the mean over the time the load took, and (the client
        # paces itself) not far above the fastest rate it aimed for (1.7x the mean it aimed for)
        got_rate, aim_rate = a.deposits / load_secs, a.deposits / a.duration
        res.check("tps chart: committed peak is plausible for the rate sent",
                  0.6 * got_rate <= dom["peakCommitted"] <= 8 * aim_rate and peak_shown > 0,
                  "peak %.1f/s, mean achieved %.1f/s, aimed %.1f/s, live-shown max %.1f/s"
                  % (dom["peakCommitted"], got_rate, aim_rate, peak_shown))
        res.check("tps chart reads 0/s once the load stopped", float(tps["last"]) == 0, "data-last=%s" % tps["last"])

        # ---- latency ----------------------------------------------------------------------------------
        L = st["latency"]
        res.check("latency chart has points", int(dom["lat"]["points"]) >= 3, "data-points=%s" % dom["lat"]["points"])
        res.check("#p99-ms and #p50-ms equal /stats", abs(dom["p99"] - L["p99_ms"]) < 1e-9 and abs(dom["p50"] - L["p50_ms"]) < 1e-9,
                  "page p50 %s p99 %s, /stats p50 %s p99 %s" % (dom["p50"], dom["p99"], L["p50_ms"], L["p99_ms"]))
        res.check("latency chart's last p99 equals /stats", abs(float(dom["lat"]["last"]) - L["p99_ms"]) < 1e-9
                  and 0 < L["p50_ms"] <= L["p99_ms"], "data-last=%s" % dom["lat"]["last"])

        # ---- queue --------------------------------------------------------------------------------------
        res.check("queue chart has a point per reading and #queue-depth equals /stats",
                  int(dom["queue"]["points"]) >= int(tps["points"]) and dom["queueDepth"] == st["queue"]["depth"],
                  "points %s, depth %s vs %s" % (dom["queue"]["points"], dom["queueDepth"], st["queue"]["depth"]))

        # ---- average balance ----------------------------------------------------------------------------
        ab = st["average_balance"]
        expect_avg = (SEED_SUM + load.deposited) / SEED_ACCOUNTS
        res.check("balance chart has the server's samples", int(dom["bal"]["points"]) >= 1
                  and abs(int(dom["bal"]["points"]) - len(ab["samples"])) <= 1 and dom["samples"] == int(dom["bal"]["points"]),
                  "data-points=%s, /stats has %d, #samples %s" % (dom["bal"]["points"], len(ab["samples"]), dom["samples"]))
        res.check("#avg-balance equals /stats average_balance.current", abs(dom["avg"] - ab["current"]) < 1e-6,
                  "%s vs %s (%s shown)" % (dom["avg"], ab["current"], dom["avgText"]))
        res.check("average balance is the seed's plus what was deposited", abs(dom["avg"] - expect_avg) < 0.01,
                  "page %.4f, expected %.4f" % (dom["avg"], expect_avg))
        res.check("balance chart's last sample is the current average", abs(float(dom["bal"]["last"]) - ab["current"]) < 0.01,
                  "data-last=%s" % dom["bal"]["last"])
        first = float(dom["bal"]["first"])
        res.check("balance chart rose from the seed average", abs(first - SEED_SUM / SEED_ACCOUNTS) < 0.01 + load.deposited / SEED_ACCOUNTS
                  and float(dom["bal"]["last"]) > first if load.deposited else True,
                  "first %.4f, last %s" % (first, dom["bal"]["last"]))

        # ---- pixels: the charts really drew something -----------------------------------------------
        if a.screenshot:
            with open(a.screenshot, "wb") as f:
                f.write(shot)
        w, h, _, _ = cdp.decode_png(shot)
        res.check("screenshot is 1280x900", (w, h) == (1280, 900), "%dx%d" % (w, h))
        for cid, color, least in (("chart-tps", "committed", 150), ("chart-balance", "balance", 150),
                                  ("chart-latency", "p99", 100)):
            r = dom["rects"][cid]
            part = browser.screenshot({"x": r["x"], "y": r["y"], "width": r["width"], "height": r["height"]})
            n = cdp.count_color(part, COLORS[color], tol=30)
            res.check("%s canvas shows its %s line" % (cid, color), n >= least, "%d pixels of that colour" % n)

        errs = browser.console_errors()
        res.check("no script errors on the page", not errs, json.dumps(errs)[:400] if errs else "")

        # ---- a failed poll: stop the server, the page must say so -----------------------------------
        if a.pid:
            os.kill(a.pid, signal.SIGTERM)
            try:
                browser.wait_for("document.body.dataset.status === 'disconnected'"
                                 " && document.getElementById('status').textContent === 'disconnected'", timeout=12)
                ok = True
            except cdp.CDPError:
                ok = False
            res.check("page shows 'disconnected' once tallyd is gone, and keeps its data", ok and
                      browser.eval("document.getElementById('committed-total').textContent.replace(/,/g,'')") == str(a.deposits))
            p0 = browser.eval("+document.body.dataset.polls")
            time.sleep(2.2)
            res.check("page keeps retrying while disconnected (no crash, no new readings)",
                      browser.eval("document.body.dataset.status") == "disconnected"
                      and browser.eval("+document.body.dataset.polls") == p0 and not browser.console_errors())
    finally:
        browser.close()

    print("%d passed, %d failed" % (res.passed, res.failed), flush=True)
    return 0 if res.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
