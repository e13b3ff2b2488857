"""The one build step pyproject.toml cannot declare: the wheel gets specdec_client/_pb, the gRPC stubs of the
public API, generated from the repository's proto/ by the same script that generates the checkout's own
(scripts/gen_proto.py), as gRPC's packages generate theirs at build time. The checkout's gitignored copy is
never packaged."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

REPO = Path(__file__).resolve().parents[2]


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--client-into", self.build_lib],
                       check=True)


setup(cmdclass={"build_py": BuildPyWithStubs})
