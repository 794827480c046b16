"""Print the project's pinned dependencies from pyproject.toml, one per line, for the image's
dependency layer (the code is not in the build yet). With a local label (``cpu``), torch
and torchvision are pinned to that build: ``torch==2.14.1+cpu``. Extras (``ray``) add
their optional dependencies: the image is also a Ray node's (k8s/ray/).

Usage: python3 requirements.py pyproject.toml [local-label] [extra,extra...]
"""

import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
label = sys.argv[2] if len(sys.argv) > 2 else ""
extras = [e for e in (sys.argv[3] if len(sys.argv) > 3 else "").split(",") if e]
dependencies = list(project["dependencies"])
for extra in extras:
    if extra not in project.get("optional-dependencies", {}):
        sys.exit(f"requirements.py: pyproject.toml has no extra {extra!r}")
    # an extra naming the project itself (trainyard[k8s]) is not a package to install
    own = project["name"] + "["
    dependencies += [r for r in project["optional-dependencies"][extra] if not r.startswith(own)]
for requirement in dependencies:
    if label and re.fullmatch(r"(torch|torchvision)==[0-9.]+", requirement):
        requirement = f"{requirement}+{label}"
    print(requirement)
