#!/usr/bin/env python3
"""Power-loss test of tallyd on lossyfs: load, cut the power at a random moment, boot, audit.

Each cycle mounts lossyfs over the backing directory (what the disk kept so far), starts tallyd on
it with the given durability, sends concurrent deposits and withdrawals over many keep-alive
connections, and after a random delay cuts the power: lossyfs discards everything not yet fsynced
and detaches, and tallyd is killed with SIGKILL in the same instant. The next boot (or the final
one) audits what survived against what the clients saw:

- every acknowledged transaction (a 200 answer) is in `journal` with its id, card, amount and the
  balance it reported; one that is missing or different counts as LOST;
- every journal row is explained by a request whose answer the client never saw (in flight at the
  cut, or a 5xx): a row for a request that was refused, or for no request at all, is a violation;
- each journal row's balance_after is the opening balance plus the running sum of amounts, and
  `tallyd verify` passes (balances equal opening + journal, integrity_check, ...);
- tallyd starts again on what survived and answers /readyz.

Cycles accumulate on one database, as repeated outages of one machine would. Standard library
only; every request goes to 127.0.0.1, every loop is bounded in time.
"""

import argparse
import collections
import http.client
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

MOUNT_TIMEOUT_S = 15
READY_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 5
# A cycle's load never runs longer than this, whatever the cut delay says.
LOAD_MAX_S = 60
AMOUNT_MAX = 10_000
# Above any opening balance of the seed (at most 100000 + 999 * 100): refused unless the card
# has received many deposits first.
OVERDRAFT_MIN = 1_000_000
# Well-formed but not in the seed (cards go up to 4000000000100000).
UNKNOWN_CARD = "4000000000999999"
DB_NAME = "tallyd.db"


def log(message):
    print(message, flush=True)


def replayed(log_path):
    """(transactions, accounts) the start-up logged as replayed after the balance checkpoint."""
    with open(log_path, errors="replace") as lines:
        for line in lines:
            found = re.search(r"replayed the transactions.*transactions=(\d+) accounts=(\d+)",
                              re.sub(r"\x1b\[[0-9;]*m", "", line))
            if found:
                return int(found.group(1)), int(found.group(2))
    return 0, 0


def card_number(n):
    return "4%015d" % n


class Ledger:
    """What the clients saw, across all cycles."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = collections.defaultdict(list)  # id -> [(card, amount, balance, cycle)]
        self.uncertain = collections.Counter()  # (card, amount) -> requests with no answer seen
        self.refused = collections.Counter()  # (card, amount) -> definite 4xx answers
        self.cycle_counts = collections.Counter()
        self.bad_answers = []  # 200 answers that do not describe the request sent

    def record(self, kind, card, amount, cycle, answer=None):
        with self.lock:
            self.cycle_counts[kind] += 1
            if kind == "acked":
                self.acked[answer["id"]].append((card, amount, answer["balance"], cycle))
            elif kind == "refused":
                self.refused[(card, amount)] += 1
            else:
                self.uncertain[(card, amount)] += 1


def pick_request(rng, cards):
    """Mostly ordinary deposits and withdrawals; some that must be refused (422, 404), so the
    audit can check that a refused request never left a trace."""
    roll = rng.random()
    if roll < 0.02:
        return UNKNOWN_CARD, rng.randint(1, AMOUNT_MAX)
    if roll < 0.07:
        return rng.choice(cards), -rng.randint(OVERDRAFT_MIN, 2 * OVERDRAFT_MIN)
    magnitude = rng.randint(1, AMOUNT_MAX)
    return rng.choice(cards), (magnitude if roll < 0.55 else -magnitude)


def client(address, cards, ledger, cycle, stop, seed):
    """One keep-alive connection sending random deposits and withdrawals until `stop`."""
    rng = random.Random(seed)
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + LOAD_MAX_S
    conn = None
    while not stop.is_set() and time.monotonic() < deadline:
        card, amount = pick_request(rng, cards)
        body = json.dumps({"card_number": card, "amount": amount})
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
            conn.request("POST", "/transaction", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            # Sent (maybe), no answer: it may or may not have been applied.
            ledger.record("uncertain", card, amount, cycle)
            if conn is not None:
                conn.close()
                conn = None
            stop.wait(0.05)
            continue
        if response.status == 200:
            answer = json.loads(payload)
            if (answer.get("status"), answer.get("card_number"), answer.get("amount")) != (
                    "committed", card, amount):
                ledger.bad_answers.append("%s for %s" % (payload[:200], body))
                continue
            ledger.record("acked", card, amount, cycle, answer)
        elif 400 <= response.status < 500:
            ledger.record("refused", card, amount, cycle)
        else:
            ledger.record("uncertain", card, amount, cycle)
    if conn is not None:
        conn.close()


class Rig:
    """The processes of one run: lossyfs and tallyd. Everything started is ended in `close`."""

    def __init__(self, args):
        self.args = args
        self.mnt = os.path.join(args.workdir, "mnt")
        self.disk = os.path.join(args.workdir, "disk")
        self.db = os.path.join(self.mnt, DB_NAME)
        os.makedirs(self.mnt, exist_ok=True)
        os.makedirs(self.disk, exist_ok=True)
        self.fs = None
        self.server = None
        self.address = None
        self.boots = 0

    def note_pids(self):
        """Records the live children's pids, so ci-powerloss.sh can end them if this driver is
        killed before it could."""
        live = [child.pid for child in (self.fs, self.server) if child is not None]
        with open(os.path.join(self.args.workdir, "pids"), "w") as pids:
            pids.writelines("%d\n" % pid for pid in live)

    def is_mounted(self):
        with open("/proc/self/mounts") as mounts:
            return any(
                line.split(" ")[0] == "lossyfs" and line.split(" ")[1] == self.mnt
                for line in mounts
            )

    def mount(self, tear_seed):
        self.boots += 1
        fs_log = open(os.path.join(self.args.workdir, "lossyfs.log"), "a")
        self.fs = subprocess.Popen(
            [self.args.lossyfs, "--tear-seed", str(tear_seed), self.mnt, self.disk],
            stdin=subprocess.DEVNULL, stdout=fs_log, stderr=fs_log,
        )
        self.note_pids()
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not self.is_mounted():
            if self.fs.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lossyfs did not mount; see lossyfs.log")
            time.sleep(0.01)

    def spawn_server(self):
        """Starts tallyd without waiting for it; returns its log's path."""
        log_path = os.path.join(self.args.workdir, "tallyd-%d.log" % self.boots)
        server_log = open(log_path, "w")
        env = dict(os.environ, NO_COLOR="1", RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.server = subprocess.Popen(
            [self.args.tallyd, "serve", "--db", self.db, "--listen", "127.0.0.1:0",
             "--durability", self.args.durability],
            stdin=subprocess.DEVNULL, stdout=server_log, stderr=server_log, env=env,
        )
        self.note_pids()
        self.address = None
        return log_path

    def start_server(self):
        """Starts tallyd and waits until it answers /readyz; returns what its start-up replayed
        (transactions after the balance checkpoint, accounts they moved)."""
        log_path = self.spawn_server()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.server.poll() is not None:
                raise RuntimeError("tallyd exited with %s; see %s" % (self.server.returncode, log_path))
            if time.monotonic() > deadline:
                raise RuntimeError("tallyd not ready in %ss; see %s" % (READY_TIMEOUT_S, log_path))
            if self.address is None:
                self.address_from(log_path)
            if self.address and self.ready():
                return replayed(log_path)
            time.sleep(0.1)

    def address_from(self, log_path):
        with open(log_path, errors="replace") as lines:
            for line in lines:
                line = re.sub(r"\x1b\[[0-9;]*m", "", line)
                found = re.search(r"listening.*addr=(\S+)", line)
                if found:
                    self.address = found.group(1)
                    return True
        self.address = None
        return False

    def ready(self):
        host, port = self.address.rsplit(":", 1)
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            conn.request("GET", "/readyz")
            status = conn.getresponse().status
            conn.close()
            return status == 200
        except (OSError, http.client.HTTPException):
            return False

    def cut(self, tear):
        """The power goes out: the disk freezes first, then the process dies with the machine."""
        self.fs.send_signal(signal.SIGUSR2 if tear else signal.SIGUSR1)
        self.server.kill()
        self.server.wait()
        self.server = None
        self.fs.wait(timeout=MOUNT_TIMEOUT_S)
        self.fs = None
        self.note_pids()

    def stop_cleanly(self):
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            code = self.server.wait(timeout=60)
            self.server = None
            if code != 0:
                raise RuntimeError("tallyd exited %s on SIGTERM" % code)
        if self.fs is not None:
            self.fs.send_signal(signal.SIGTERM)
            self.fs.wait(timeout=MOUNT_TIMEOUT_S)
            self.fs = None
        self.note_pids()

    def close(self):
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        if self.fs is not None:
            self.fs.send_signal(signal.SIGUSR1)
            try:
                self.fs.wait(timeout=MOUNT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.fs.kill()
        if self.is_mounted():
            subprocess.run(["umount", "-l", self.mnt], check=False)
        self.server = self.fs = None
        self.note_pids()


def audit(rig, ledger, tallyd):
    """Checks the surviving database against the ledger. Returns (lost, problems)."""
    problems = []
    verify = subprocess.run([tallyd, "verify", "--db", rig.db], capture_output=True, text=True)
    if verify.returncode != 0:
        problems.append("tallyd verify failed:\n" + verify.stdout + verify.stderr)
    conn = sqlite3.connect(rig.db)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append("integrity_check: %s" % integrity)
        rows = {
            row[0]: row[1:]
            for row in conn.execute("SELECT id, card_number, amount, balance_after FROM journal")
        }
        broken_chain = conn.execute(
            """SELECT count(*) FROM (
                 SELECT j.balance_after AS after,
                        a.opening_balance + SUM(j.amount) OVER (
                          PARTITION BY j.card_number ORDER BY j.id) AS expected
                 FROM journal j JOIN accounts a USING (card_number))
               WHERE after != expected"""
        ).fetchone()[0]
        if broken_chain:
            problems.append("%d journal rows whose balance_after is not the running sum" % broken_chain)
        last_balance_mismatch = conn.execute(
            """SELECT count(*) FROM accounts a
               LEFT JOIN (SELECT card_number, SUM(amount) AS total FROM journal
                          GROUP BY card_number) j USING (card_number)
               WHERE a.balance != a.opening_balance + COALESCE(j.total, 0)"""
        ).fetchone()[0]
        if last_balance_mismatch:
            problems.append("%d accounts whose balance is not opening + journal" % last_balance_mismatch)
    finally:
        conn.close()
    lost = 0
    explained = set()
    with ledger.lock:
        for ack_id, acks in ledger.acked.items():
            for card, amount, balance, _cycle in acks:
                if rows.get(ack_id) == (card, amount, balance):
                    explained.add(ack_id)
                else:
                    lost += 1
        uncertain = collections.Counter(ledger.uncertain)
        refused = ledger.refused
    unexplained = 0
    for row_id, (card, amount, _balance) in sorted(rows.items()):
        if row_id in explained:
            continue
        if uncertain[(card, amount)] > 0:
            uncertain[(card, amount)] -= 1
        else:
            unexplained += 1
            if unexplained <= 5:
                why = "was refused" if refused[(card, amount)] else "was never sent"
                problems.append("journal row %d (%s, %d) %s" % (row_id, card, amount, why))
    if unexplained:
        problems.append("%d journal rows no unanswered request explains" % unexplained)
    return lost, len(rows), problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tallyd", required=True)
    parser.add_argument("--lossyfs", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--durability", choices=["full", "normal"], required=True)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--cards", type=int, default=300)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--cut-after-min", type=float, default=1.0)
    parser.add_argument("--cut-after-max", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--expect-loss", action="store_true",
                        help="fail unless at least one acknowledged transaction is lost")
    args = parser.parse_args()
    # `timeout` and CI stop with SIGTERM: turn it into an exception so `finally` ends our children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    cards = [card_number(n) for n in range(1, args.cards + 1)]
    log("powerloss: durability=%s cycles=%d connections=%d cards=%d seed=%d (rerun with --seed %d)"
        % (args.durability, args.cycles, args.connections, args.cards, seed, seed))
    ledger = Ledger()
    rig = Rig(args)
    # Acknowledged transactions missing at the latest audit; each audit checks every ack so far.
    total_lost = 0
    failures = []
    # What each boot after a cut replayed: a cut between commits and their write-back shows here.
    replays = []
    try:
        for cycle in range(1, args.cycles + 1):
            rig.mount(tear_seed=rng.randrange(1 << 32))
            if cycle > 1 and cycle % 3 == 0:
                # The power goes out again while tallyd starts: during WAL recovery, the load of
                # every balance, or the replay of the journal after the balance checkpoint.
                rig.spawn_server()
                early = rng.uniform(0.0, 0.3)
                time.sleep(early)
                rig.cut(tear=False)
                log("cycle %d/%d: cut again %.2fs into the start-up" % (cycle, args.cycles, early))
                rig.mount(tear_seed=rng.randrange(1 << 32))
            # tallyd is the first to open the database after the outage, as in production.
            replay = rig.start_server()
            if cycle > 1:
                log("  boot after cut %d replayed %d transactions onto %d accounts past the balance "
                    "checkpoint" % (cycle - 1, replay[0], replay[1]))
                replays.append(replay[0])
                lost, rows, problems = audit(rig, ledger, args.tallyd)
                report_audit(cycle - 1, lost, lost - total_lost, rows, problems, failures)
                total_lost = lost
            stop = threading.Event()
            ledger.cycle_counts.clear()
            clients = [
                threading.Thread(target=client, daemon=True,
                                 args=(rig.address, cards, ledger, cycle, stop, rng.random()))
                for _ in range(args.connections)
            ]
            for thread in clients:
                thread.start()
            delay = rng.uniform(args.cut_after_min, args.cut_after_max)
            tear = cycle % 2 == 0
            time.sleep(delay)
            rig.cut(tear)
            stop.set()
            for thread in clients:
                thread.join(timeout=REQUEST_TIMEOUT_S + 5)
            counts = ledger.cycle_counts
            log("cycle %d/%d: cut%s after %.2fs under load: acknowledged %d, refused %d, "
                "unanswered %d" % (cycle, args.cycles, " (torn write)" if tear else "", delay,
                                   counts["acked"], counts["refused"], counts["uncertain"]))
        rig.mount(tear_seed=0)
        rig.start_server()
        lost, rows, problems = audit(rig, ledger, args.tallyd)
        report_audit(args.cycles, lost, lost - total_lost, rows, problems, failures)
        total_lost = lost
        rig.stop_cleanly()
        log("final boot: tallyd started on what survived, answered /readyz and stopped cleanly")
    except Exception as err:  # noqa: BLE001 - report any harness failure as a failed run
        failures.append("harness: %r" % err)
    finally:
        rig.close()
    acked = sum(len(acks) for acks in ledger.acked.values())
    log("powerloss summary: durability=%s cycles=%d acknowledged=%d lost=%d refused=%d "
        "unanswered=%d seed=%d" % (args.durability, args.cycles, acked, total_lost,
                                   sum(ledger.refused.values()), sum(ledger.uncertain.values()),
                                   seed))
    if args.cycles > 1 and not any(replays):
        failures.append("no boot replayed anything: no cut landed between a commit and its write-back")
    for bad in ledger.bad_answers[:5]:
        failures.append("a 200 that does not match its request: %s" % bad)
    if args.expect_loss and total_lost == 0:
        failures.append("durability=%s lost nothing in %d cycles: the simulator keeps data a real "
                        "disk would lose" % (args.durability, args.cycles))
    if not args.expect_loss and total_lost:
        failures.append("%d acknowledged transactions lost" % total_lost)
    for failure in failures:
        log("FAIL: " + failure)
    return 1 if failures else 0


def report_audit(cycle, lost, new_lost, rows, problems, failures):
    """`lost` counts every acknowledged transaction so far that is not in the database."""
    status = "ok" if not problems else "%d problems" % len(problems)
    log("  audit after cut %d: %d journal rows, acknowledged but missing %d (%d new), "
        "consistency %s" % (cycle, rows, lost, new_lost, status))
    for problem in problems:
        failures.append("after cut %d: %s" % (cycle, problem))


if __name__ == "__main__":
    sys.exit(main())
