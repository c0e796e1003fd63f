"""``python -m relay_agents.tiny build|ship|eval|path``: build, ship, evaluate or locate the tiny models."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rich.logging import RichHandler

from relay_agents.progress import STDERR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay_agents.tiny")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="load (shipped or cached) or train the tiny student/teacher/solo")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--force", action="store_true", help="train even if shipped or cached")
    s = sub.add_parser(
        "ship", help="build the default recipe in the cache (or load it there) and copy it into the package"
    )
    s.add_argument("--cache-dir", default=None)
    s.add_argument("--force", action="store_true", help="train even if cached")
    e = sub.add_parser("eval", help="held-out accuracy (transformers, greedy; --vllm: the relay engine)")
    e.add_argument("--cache-dir", default=None)
    e.add_argument("-n", type=int, default=200)
    e.add_argument("--vllm", action="store_true", help="serve the models with vLLM and evaluate there")
    p = sub.add_parser("path", help="print the student, teacher and solo directories (builds if needed)")
    p.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if STDERR.is_terminal:  # log lines print above the progress bars
        handler = RichHandler(console=STDERR, show_path=False)
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from .build import build_tiny_pair, read_stats, ship_pair

    force = getattr(args, "force", False)
    pair = build_tiny_pair(args.cache_dir, force=force, use_shipped=args.cmd != "ship")
    if args.cmd == "ship":
        print(ship_pair(pair).root)
    elif args.cmd == "build":
        print(
            json.dumps(
                {
                    "student_dir": str(pair.student_dir),
                    "teacher_dir": str(pair.teacher_dir),
                    "solo_dir": str(pair.solo_dir),
                    "stats": read_stats(pair),
                },
                indent=2,
            )
        )
    elif args.cmd == "path":
        print(pair.student_dir)
        print(pair.teacher_dir)
        print(pair.solo_dir)
    else:
        if args.vllm:
            import asyncio

            from .evaluate import evaluate_servers
            from .servers import solo_server, tiny_pair_servers

            with tiny_pair_servers(cache_dir=args.cache_dir) as servers, solo_server(servers) as solo:
                res = asyncio.run(evaluate_servers(servers, solo, n=args.n))
                res["server_start_seconds"] = max(
                    s.startup_seconds or 0.0 for s in (servers.student, servers.teacher, solo)
                )
        else:
            from .evaluate import evaluate_pair

            res = evaluate_pair(pair, n=args.n)
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
