"""The installed code's one import root, `mer`, over the repository's top-level folders (metadata: pyproject.toml).

`mer.model` is the pure library in mer_model/, `mer.components` the steps in components/, `mer.pipelines` the
orchestration in pipelines/; `mer` itself is a namespace, so nothing else claims a generic top-level name such as
`components` or `pipelines` in site-packages.
"""

from setuptools import find_packages, setup

FOLDERS = {"mer.model": "mer_model", "mer.components": "components", "mer.pipelines": "pipelines"}

setup(
    package_dir=FOLDERS,
    packages=[f"{name}{'.' + sub if sub else ''}" for name, folder in FOLDERS.items()
              for sub in ("", *find_packages(folder))],
)
