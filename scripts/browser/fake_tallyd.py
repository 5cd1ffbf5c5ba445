#!/usr/bin/env python3
"""A stand-in for tallyd's observable surface (docs/CONTRACT.md), for working on the dashboard
without the real server: GET / (assets/dashboard.html), /stats, /metrics, /healthz and
POST /transaction on a handful of in-memory accounts. Python stdlib only.

    python3 scripts/browser/fake_tallyd.py --listen 127.0.0.1:0 [--prefill 3600] [--traffic]

Prints `listening addr=IP:PORT` on stderr like tallyd. --prefill N fills the balance ring with N
past samples (to see the page with 1,000+ points); --traffic makes up background transactions.
"""
import argparse, json, os, random, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "..", "..", "assets", "dashboard.html")
OUTCOMES = ["committed", "insufficient_funds", "card_not_found", "rejected", "queue_full", "error"]


class Fake:
    def __init__(self, n_accounts, balance_ring, latency_ring):
        self.lock = threading.Lock()
        self.start = time.time()
        self.accounts = {"1234567890": 100000}
        for n in range(1, n_accounts + 1):
            self.accounts["4%015d" % n] = 100000 + (n % 1000) * 100
        self.sum = sum(self.accounts.values())
        self.counts = {(k, o): 0 for k in ("deposit", "withdrawal", "unknown") for o in OUTCOMES}
        self.lat = []
        self.latency_ring = latency_ring
        self.balance_ring = balance_ring
        self.samples = []
        self.depth = 0
        self.next_id = 1

    def avg(self):
        return self.sum / len(self.accounts)

    def tick(self):  # once a second, like tallyd's sampler
        with self.lock:
            self.samples.append({"unix_ms": int(time.time() * 1000), "average": self.avg()})
            del self.samples[:-self.balance_ring]

    def record(self, kind, outcome, ms):
        self.counts[(kind, outcome)] += 1
        self.lat.append(ms)
        del self.lat[:-self.latency_ring]

    def transact(self, card, amount):
        t0 = time.perf_counter()
        kind = "deposit" if isinstance(amount, int) and amount >= 0 else "withdrawal" if isinstance(amount, int) else "unknown"
        with self.lock:
            if not isinstance(card, str) or not isinstance(amount, int) or isinstance(amount, bool):
                self.record(kind, "rejected", 0.05)
                return 400, {"error": {"code": "invalid_amount", "message": "bad request"}}
            if card not in self.accounts:
                self.record(kind, "card_not_found", 0.05)
                return 404, {"error": {"code": "card_not_found", "message": "no such card"}}
            bal = self.accounts[card]
            if bal + amount < 0:
                self.record(kind, "insufficient_funds", 0.1)
                return 422, {"error": {"code": "insufficient_funds", "message": "insufficient funds", "balance": bal}}
            self.accounts[card] = bal + amount
            self.sum += amount
            i = self.next_id
            self.next_id += 1
            ms = (time.perf_counter() - t0) * 1000 + random.uniform(0.4, 1.5) + (random.random() < 0.02) * random.uniform(2, 8)
            self.record(kind, "committed", ms)
            return 200, {"id": i, "card_number": card, "amount": amount, "balance": bal + amount, "status": "committed"}

    def stats(self):
        with self.lock:
            lat = sorted(self.lat)
            q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0
            tx = {o: sum(v for (k, oo), v in self.counts.items() if oo == o) for o in OUTCOMES}
            return {
                "uptime_seconds": round(time.time() - self.start, 3),
                "queue": {"depth": self.depth, "capacity": 8192},
                "workers": 2,
                "transactions": tx,
                "latency": {"window": self.latency_ring, "count": len(lat),
                            "mean_ms": sum(lat) / len(lat) if lat else 0.0, "p50_ms": q(0.5),
                            "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": lat[-1] if lat else 0.0},
                "average_balance": {"window": self.balance_ring, "current": self.avg(),
                                    "samples": list(self.samples)},
            }

    def metrics(self):
        with self.lock:
            out = ["# HELP tallyd_transactions_total Transactions by kind and outcome.",
                   "# TYPE tallyd_transactions_total counter"]
            for (k, o), v in sorted(self.counts.items()):
                out.append('tallyd_transactions_total{kind="%s",outcome="%s"} %d' % (k, o, v))
            out += ["# TYPE tallyd_queue_depth gauge", "tallyd_queue_depth %d" % self.depth,
                    "# TYPE tallyd_queue_capacity gauge", "tallyd_queue_capacity 8192",
                    "# TYPE tallyd_workers gauge", "tallyd_workers 2",
                    "# TYPE tallyd_average_balance gauge", "tallyd_average_balance %r" % self.avg(),
                    "# TYPE tallyd_uptime_seconds gauge", "tallyd_uptime_seconds %.3f" % (time.time() - self.start)]
            return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--accounts", type=int, default=100000)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--traffic", action="store_true")
    a = ap.parse_args()
    fake = Fake(a.accounts, 3600, 1000)
    if a.prefill:
        now = time.time()
        base = fake.avg()
        for i in range(a.prefill):
            t = now - (a.prefill - i)
            fake.samples.append({"unix_ms": int(t * 1000), "average": base + 40 * i / a.prefill + 6 * random.random()})
        fake.sum += int(40 * len(fake.accounts))

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send(self, code, body, ctype="application/json"):
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            p = self.path.split("?")[0]
            if p == "/":
                with open(PAGE, "rb") as f:
                    self.send(200, f.read(), "text/html; charset=utf-8")
            elif p == "/stats":
                self.send(200, fake.stats())
            elif p == "/metrics":
                self.send(200, fake.metrics(), "text/plain; version=0.0.4")
            elif p in ("/healthz", "/readyz"):
                self.send(200, {"status": "ok"})
            else:
                self.send(404, {"error": {"code": "not_found", "message": "no route"}})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n)
            if self.path != "/transaction":
                return self.send(404, {"error": {"code": "not_found", "message": "no route"}})
            try:
                j = json.loads(raw)
            except ValueError:
                return self.send(400, {"error": {"code": "invalid_json", "message": "bad json"}})
            code, body = fake.transact(j.get("card_number"), j.get("amount"))
            self.send(code, body)

    srv = ThreadingHTTPServer(tuple([a.listen.rsplit(":", 1)[0], int(a.listen.rsplit(":", 1)[1])]), H)
    srv.daemon_threads = True

    def sampler():
        while True:
            fake.tick()
            time.sleep(1)

    def traffic():
        cards = list(fake.accounts)
        while True:
            burst = random.randint(20, 120)
            for _ in range(burst):
                fake.transact(random.choice(cards), random.choice([150, 500, -200, -250000, 1000]))
            if random.random() < 0.05:
                fake.transact("4999999999999999", 10)
            fake.depth = max(0, int(random.gauss(burst / 10, 3)))
            time.sleep(0.25)

    threading.Thread(target=sampler, daemon=True).start()
    if a.traffic:
        threading.Thread(target=traffic, daemon=True).start()
    print("fake_tallyd listening addr=%s:%d" % srv.server_address[:2], file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
