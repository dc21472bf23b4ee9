import pytest

from xen_vtpm.errors import XlConfigError
from xen_vtpm.xen.xlcfg import load_cfg, parse_cfg, parse_disk, parse_vtpm

UUID = "ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839"


def test_vtpm_platforms_example_parses():
    cfg = parse_cfg(f'''# vtpm-guest1.cfg from docs/misc/vtpm-platforms.txt
name="vtpm-guest1"
kernel="/usr/lib/xen/boot/vtpm-stubdom.gz"
extra="loglevel=debug"
memory=8
disk=["file:/images/vtpm-guest1.img,hda,w"]
vtpm=["backend=vtpmmgr,uuid={UUID}"]
''')
    assert cfg == {"name": "vtpm-guest1", "kernel": "/usr/lib/xen/boot/vtpm-stubdom.gz", "extra": "loglevel=debug",
                   "memory": 8, "disk": ["file:/images/vtpm-guest1.img,hda,w"],
                   "vtpm": [f"backend=vtpmmgr,uuid={UUID}"]}


def test_syntax_variants():
    cfg = parse_cfg("name='g' ; memory = 0x40 # hex\n"
                    "disk = [ 'a,hda,w',   # first\n"
                    "         \"b,hdb,r\",\n"
                    "]\n"
                    "empty=[]\nvcpus=2\nextra=\"say \\\"hi\\\"\"\nextra+=\" more\"\n")
    assert cfg == {"name": "g", "memory": 64, "disk": ["a,hda,w", "b,hdb,r"], "empty": [], "vcpus": 2,
                   "extra": 'say "hi" more'}


def test_uuid_is_canonicalised():
    assert parse_cfg(f'uuid="{UUID.upper()}"')["uuid"] == UUID


@pytest.mark.parametrize("text, line, cause", [
    ('name="g"\nmemory=\n', 2, "expected a string, a number or a list"),
    ('name="g\n', 1, "unterminated string"),
    ('name="g"\n\ndisk=["a" "b"]\n', 3, "expected `,' or `]'"),
    ('name "g"\n', 1, "expected `='"),
    ('name="g" memory=3\n', 1, "expected newline"),
    ('disk=[\n"a",\n', 3, "list items must be"),
    ('vtpm="backend=x"\n', None, "vtpm must be a list"),
    ('memory="8"\n', None, "memory must be an integer"),
    ('name=$x\n', 1, "unexpected character"),
    ('uuid="nope"\n', None, "invalid uuid"),
])
def test_errors_name_file_and_line(text, line, cause):
    with pytest.raises(XlConfigError) as exc:
        parse_cfg(text, "guest.cfg")
    msg = str(exc.value)
    assert msg.startswith(f"guest.cfg:{line}:" if line else "guest.cfg:")
    assert cause in msg and "\n" not in msg


def test_load_cfg_missing_file(tmp_path):
    with pytest.raises(XlConfigError, match="cannot read config file"):
        load_cfg(str(tmp_path / "nope.cfg"))


def test_parse_disk():
    assert parse_disk("file:/images/x.img,hda,w") == {"target": "/images/x.img", "vdev": "hda", "access": "rw",
                                                     "format": "raw"}
    assert parse_disk("phy:/dev/vg/x,xvda,r") == {"target": "/dev/vg/x", "vdev": "xvda", "access": "ro",
                                                  "format": "raw"}
    assert parse_disk("vdev=xvdb,access=rw,target=/img/y") == {"target": "/img/y", "vdev": "xvdb", "access": "rw",
                                                               "format": "raw"}
    assert parse_disk("tap:qcow2:/img/q,hda,w")["format"] == "qcow2"
    assert parse_disk("/img/v,vhd,hda,w") == {"target": "/img/v", "vdev": "hda", "access": "rw", "format": "vhd"}
    assert parse_disk("format=qcow2,vdev=hda,target=/img/q")["format"] == "qcow2"
    for bad in ("/img", "/img,hda,x", "/img,hda,w,extra", "/img,hda,w,a,b",
                "format=iso,vdev=hda,target=/i"):
        with pytest.raises(XlConfigError):
            parse_disk(bad)


def test_parse_vtpm():
    assert parse_vtpm("backend=vtpm-g1") == {"backend": "vtpm-g1", "uuid": None}
    assert parse_vtpm(f"backend=3,uuid={UUID.upper()}") == {"backend": "3", "uuid": UUID}
    for bad, cause in (("uuid=" + UUID, "backend= is required"), ("backend=x,devid=1", "invalid parameter"),
                       ("backend=x,uuid=zz", "invalid uuid"), ("backend", "invalid parameter")):
        with pytest.raises(XlConfigError, match=cause):
            parse_vtpm(bad)
