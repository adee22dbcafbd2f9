"""Start the studio.

    python -m studio [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--share] [--runs-dir runs]
                     [--config TRAIN.yaml]

Binds 127.0.0.1 by default. Listening on another interface (``--host 0.0.0.0``) or through a public share link
(``--share``) starts training jobs and reads files on this machine on anyone's behalf, so it REFUSES to start
(exit 2) without a login: ``--auth user:pass`` or the environment variable ``SFT_STUDIO_AUTH=user:pass``.
"""

from __future__ import annotations

import argparse
import os
import sys

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:pass' -> ("user", "pass"); None/'' -> None; anything else -> ValueError."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("expected user:password (both non-empty)")
    return user, password


def check_exposure(host: str, share: bool, auth: tuple[str, str] | None) -> str | None:
    """The refusal message when the studio would be reachable by others without a login, else None."""
    exposed = []
    if host not in LOOPBACK:
        exposed.append(f"--host {host} listens beyond this machine")
    if share:
        exposed.append("--share publishes a public link")
    if exposed and auth is None:
        return (
            "refusing to start: " + " and ".join(exposed) + ", and the studio launches processes and reads "
            "files here. Add --auth user:password (or set SFT_STUDIO_AUTH=user:password), or use --host "
            "127.0.0.1 without --share."
        )
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studio", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--auth", default=None, help="user:password (default: env SFT_STUDIO_AUTH)")
    ap.add_argument("--share", action="store_true", help="public gradio link (needs --auth)")
    ap.add_argument("--runs-dir", default="runs", help="where experiment directories live (default runs/)")
    ap.add_argument(
        "--config", default=None, help="train YAML to open in the Config tab (default: assets/configs/tiny_train.yaml)"
    )
    args = ap.parse_args(argv)
    if args.config and not os.path.isfile(args.config):
        print(f"--config: no such file: {os.path.abspath(args.config)}", file=sys.stderr)
        return 2
    try:
        auth = parse_auth(args.auth or os.environ.get("SFT_STUDIO_AUTH"))
    except ValueError as e:
        print(f"--auth / SFT_STUDIO_AUTH: {e}", file=sys.stderr)
        return 2
    refusal = check_exposure(args.host, args.share, auth)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    from studio.app import CSS, build_app
    from studio.handlers import warm_up

    warm_up()
    demo = build_app(runs_dir=args.runs_dir, train_config=args.config)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        share=args.share,
        css=CSS,
        footer_links=[],
        show_error=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
