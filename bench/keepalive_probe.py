#!/usr/bin/env python3
"""Per-request time of our server on one kept-alive connection (what the openai client, llama-benchy and
`spark-setup bench` use): median of 10 `GET /v1/models` and 10 one-token chat completions per port.

    python bench/keepalive_probe.py PORT [PORT ...]     # servers already running on 127.0.0.1
"""

import statistics
import sys
import time

import httpx

BODY = {"model": "x", "max_tokens": 1, "think": False,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]}

for port in sys.argv[1:]:
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=30) as c:
        c.get(url + "/v1/models")  # opens the connection: the first request is not the measured case
        gets, posts = [], []
        for _ in range(10):
            t = time.perf_counter()
            c.get(url + "/v1/models")
            gets.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.post(url + "/v1/chat/completions", json=BODY)
            posts.append(time.perf_counter() - t)
    print(f"port {port}: keep-alive GET /v1/models median {statistics.median(gets) * 1e3:.1f} ms, "
          f"POST chat (1 token) median {statistics.median(posts) * 1e3:.1f} ms")
