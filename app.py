"""python app.py: the quantlab web app (also what a Hugging Face Space runs).

    python app.py                      # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 8080
    python app.py --public             # as on a Space: see webui/access.py
"""

from __future__ import annotations

import argparse
import os

from webui import build_app


def parse_args(argv=None) -> argparse.Namespace:
    on_space = bool(os.environ.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A Space routes traffic to 0.0.0.0:7860; on a laptop only this machine should reach the app.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--public", action="store_true",
                        help="limit the app as on a Space (on by itself when SPACE_ID is set): sources are the demo, "
                             "Hub ids and uploads; each visitor has their own library; uploads are capped")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    build_app(public=args.public).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
