#!/usr/bin/env python3
"""Makes a database like the Flask transaction processor's set-up script and its 20 worker threads left it.

Usage: make_users_db.py PATH [--cards 10000] [--rows 10] [--seed 1]

Tables `users(card_number TEXT PRIMARY KEY, balance INTEGER)` and `transactions(id INTEGER PRIMARY KEY
AUTOINCREMENT, card_number TEXT, amount INTEGER, success INTEGER, timestamp DATETIME DEFAULT CURRENT_TIMESTAMP)`;
cards `6219 8619 NNNN 8640` with opening balances from 50,000 to 10,000,000; each card gets about ROWS
transactions of -5,000 to 5,000, declined (success = 0) when they would overdraw or at random (about 3 %),
and about 2 % of the successful ones are lost updates (recorded, never applied to the balance), as the
processor's read-modify-write from 20 threads lost them. Python's standard library only.
"""
import argparse
import random
import sqlite3

SCHEMA = """
CREATE TABLE users (card_number TEXT PRIMARY KEY, balance INTEGER);
CREATE TABLE transactions (id INTEGER PRIMARY KEY AUTOINCREMENT, card_number TEXT, amount INTEGER,
                           success INTEGER, timestamp DATETIME DEFAULT CURRENT_TIMESTAMP);
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    conn = sqlite3.connect(args.path)
    conn.executescript(SCHEMA)
    balances = {}
    for n in range(args.cards):
        balances[f"6219 8619 {n:04d} 8640"] = rng.randint(50_000, 10_000_000)
    rows = []
    cards = list(balances)
    for k in range(args.cards * args.rows):
        card = rng.choice(cards)
        amount = rng.randint(-5_000, 5_000)
        stamp = f"2026-11-{1 + k * 28 // (args.cards * args.rows):02d} {k % 24:02d}:{k % 60:02d}:{(k // 60) % 60:02d}"
        declined = amount == 0 or balances[card] + amount < 0 or rng.random() < 0.03
        rows.append((card, amount, 0 if declined else 1, stamp))
        if not declined and rng.random() >= 0.02:
            balances[card] += amount
    conn.executemany("INSERT INTO users (card_number, balance) VALUES (?, ?)", balances.items())
    conn.executemany("INSERT INTO transactions (card_number, amount, success, timestamp) VALUES (?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()


if __name__ == "__main__":
    main()
