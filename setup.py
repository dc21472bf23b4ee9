from setuptools import find_packages, setup

setup(
    name="xen-vtpm",
    version="0.1.0",
    description="Synchronized, TPM-sealed checkpoints of Xen guests and their vTPMs",
    packages=find_packages(include=["xen_vtpm", "xen_vtpm.*", "xen_vtpm_sim", "xen_vtpm_sim.*"]),
    # The API's type information (PEP 561) and the systemd unit templates `schedule install` writes.
    package_data={"xen_vtpm": ["py.typed", "__init__.pyi", "units/*"]},
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    cffi_modules=["cext/build_hashing.py:ffi"],
    install_requires=[
        "pyxs==0.4.1",
        "cffi>=1.15",
        "cryptography>=41",
        "tpm2-pytss>=2.1",
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3.5", "hypothesis>=6"], "bench": ["blake3>=0.4"],
                    "fuzz": ["atheris>=2.3"],
                    "lint": ["ruff==0.17.6", "mypy==2.4.1", "import-linter==2.17"]},
    entry_points={
        "console_scripts": ["xen-vtpm=xen_vtpm.__main__:run"],
        # The simulated host plugs its commands into the CLI; the tool never imports it.
        "xen_vtpm.commands": ["sim = xen_vtpm_sim.cli:register", "demo = xen_vtpm_sim.demo:register"],
    },
)
