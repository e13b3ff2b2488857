"""Generate the Python gRPC code of proto/specdec/v1/*.proto (gitignored; never edit it by hand).

Two packages get stubs: specdec/pb gets every proto (the services), specdec_client/_pb only the public
Generation API (the client SDK, which imports nothing of the services). Both are generated from the same
files by the same protoc, so one process may import both: protobuf accepts a file registered twice with
identical contents.

    python scripts/gen_proto.py                    # both, in the checkout (run by `make install`)
    python scripts/gen_proto.py --client-into DIR  # the SDK's alone into DIR (the SDK's wheel build,
                                                   # clients/python/setup.py)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = "specdec/v1"
SERVICES_PACKAGE = "specdec.pb"
CLIENT_PACKAGE = "specdec_client._pb"
CLIENT_PROTOS = ("generation.proto",)  # the public API; it imports no other proto of ours


def package_dir(package: str, root: Path = ROOT) -> Path:
    return root.joinpath(*package.split("."))


def generate(protos: list[str], package: str, out: Path) -> None:
    """Replace `out` with the stubs of `protos` (names in proto/specdec/v1) as the Python package `package`."""
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf well-known types
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *(f"{PROTO_DIR}/{name}" for name in protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(protos)}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in (Path(tmp) / PROTO_DIR).iterdir():
            # protoc writes absolute imports of the proto package path; make them point at `package`.
            text = re.sub(r"^from specdec\.v1 import", f"from {package} import", f.read_text(), flags=re.M)
            (out / f.name).write_text(text)
    (out / "__init__.py").write_text(f'"""Generated from proto/{PROTO_DIR} by scripts/gen_proto.py. Do not edit."""\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client-into", type=Path, metavar="DIR",
                        help="generate only the client SDK's stubs, as DIR/specdec_client/_pb")
    args = parser.parse_args(argv)
    everything = sorted(p.name for p in (PROTO_ROOT / PROTO_DIR).glob("*.proto"))
    if args.client_into is not None:
        jobs = [(list(CLIENT_PROTOS), CLIENT_PACKAGE, package_dir(CLIENT_PACKAGE, args.client_into))]
    else:
        jobs = [(everything, SERVICES_PACKAGE, package_dir(SERVICES_PACKAGE)),
                (list(CLIENT_PROTOS), CLIENT_PACKAGE, package_dir(CLIENT_PACKAGE))]
    for protos, package, out in jobs:
        try:
            generate(protos, package, out)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"generated {len(protos)} protos into {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
