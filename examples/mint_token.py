#!/usr/bin/env python3
"""Mint a taskcast access token with PyJWT alone, as any generation service can
(README, "Access control").

    TASKCAST_JWT_SECRET=<the gateway's secret> python examples/mint_token.py 41 42

Prints a token that opens tasks 41 and 42 for 600 s. Needs PyJWT (`pip install PyJWT`).
"""

import os
import sys
import time

import jwt

secret = os.environ["TASKCAST_JWT_SECRET"]  # the gateway's HS256 secret, at least 32 bytes
tasks = [int(task_id) for task_id in sys.argv[1:]]  # the tasks this client may read
claims = {"tasks": tasks, "exp": int(time.time()) + 600}  # exp is required
print(jwt.encode(claims, secret, algorithm="HS256"))
