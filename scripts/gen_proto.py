"""Generate the Python gRPC code of proto/specdec/v1/*.proto into specdec/pb/ (gitignored).

Run by `make` (the install target); never edit the generated files by hand.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "specdec" / "pb"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "specdec" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf well-known types
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        for f in (Path(tmp) / "specdec" / "v1").iterdir():
            # protoc writes absolute imports of the proto package path; make them point at specdec.pb.
            text = re.sub(r"^from specdec\.v1 import", "from specdec.pb import", f.read_text(), flags=re.M)
            (OUT / f.name).write_text(text)
    (OUT / "__init__.py").write_text('"""Generated from proto/specdec/v1 by scripts/gen_proto.py. Do not edit."""\n')
    print(f"generated {len(protos)} protos into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
