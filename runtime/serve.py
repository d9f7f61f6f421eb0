"""python -m runtime.serve [--model PKG] [--host 127.0.0.1] [--port 8000] [--max-batch N]
[--max-delay-ms T] [--max-queue Q] [--threads N] [--api-key KEY] [--allow-unauthenticated]

A local caption service: Open Inference Protocol v2 (`tritonclient.http`, KServe), OpenAI's chat
completions (`/v1/chat/completions`, streaming) and `POST /caption` for curl, with dynamic batching
and Prometheus metrics (runtime/service.py).
Needs the serve extra: pip install "edgecap[serve]". Listens on loopback unless told otherwise;
beyond it, an API key (--api-key or EDGECAP_API_KEY) is required unless --allow-unauthenticated.
"""

import argparse
import ipaddress
import os
import sys

from .cli import USAGE_ERRORS, add_model_options, open_captioner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, precision=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="images in one forward pass")
    parser.add_argument("--max-delay-ms", type=float, default=5.0,
                        help="how long the first image of a pass waits for others")
    parser.add_argument("--max-queue", type=int, default=64, help="images waiting; beyond it requests get 503")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per request; beyond it 504")
    parser.add_argument("--max-body-mib", type=float, default=32, help="larger requests get 413 (multipart too)")
    parser.add_argument("--read-timeout-s", type=float, default=30.0,
                        help="a request body not arrived within this gets 408 and frees its connection")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="connections held at once; beyond them uvicorn answers 503")
    parser.add_argument("--decode-threads", type=int, default=2,
                        help="threads decoding images beside the graphs (0: on the graphs' thread)")
    parser.add_argument("--api-key", default=os.environ.get("EDGECAP_API_KEY"),
                        help="require Authorization: Bearer KEY on every endpoint but health (default: "
                             "$EDGECAP_API_KEY)")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="listen beyond loopback without an API key (refused otherwise)")
    return parser


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.api_key or args.allow_unauthenticated or loopback(args.host)):
        print(f"error: --host {args.host} listens beyond this machine: set --api-key (or EDGECAP_API_KEY), "
              "or pass --allow-unauthenticated", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from .service import ServiceConfig, build_app
    except ModuleNotFoundError as e:
        print(f"error: python -m runtime.serve needs the serve extra ({e.name} is missing): "
              'pip install "edgecap[serve]"', file=sys.stderr)
        return 1
    try:
        captioner = open_captioner(args, max_batch=args.max_batch)
    except USAGE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in captioner.notes:
        print(note, file=sys.stderr)
    cfg = ServiceConfig(max_batch=args.max_batch, max_delay_s=args.max_delay_ms / 1000, max_queue=args.max_queue,
                        timeout_s=args.timeout_s, max_body_bytes=int(args.max_body_mib * 2**20),
                        read_timeout_s=args.read_timeout_s, api_key=args.api_key, decode_threads=args.decode_threads)
    # uvicorn stops accepting on SIGTERM/SIGINT and lets in-flight requests finish; beyond
    # --max-connections it answers 503 at once.
    uvicorn.run(build_app(captioner, cfg), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=cfg.timeout_s, limit_concurrency=args.max_connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
