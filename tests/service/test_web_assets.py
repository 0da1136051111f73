"""The upload page's files, checked without a server: nothing loaded from elsewhere (hospital
networks are offline), server data never inserted as HTML, and the service's error shape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[2] / "src" / "bonefrac" / "serving" / "web"


@pytest.mark.parametrize("name", ["index.html", "app.js", "style.css"])
def test_web_files_load_nothing_from_other_hosts(name):
    text = (WEB / name).read_text()
    external = re.findall(r"""(?:src|href)\s*=\s*["']((?:https?:)?//[^"']+)""", text)
    external += re.findall(r"""url\(\s*["']?((?:https?:)?//[^)"']+)""", text)
    external += re.findall(r"""@import\s+["']?(?:url\()?\s*["']?(https?://[^"')]+)""", text)
    assert external == []


def test_script_never_inserts_server_text_as_html():
    script = (WEB / "app.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "document.write" not in script


def test_page_has_the_disclaimer_placeholder_in_header_and_footer():
    page = (WEB / "index.html").read_text()
    assert page.count("{{DISCLAIMER}}") == 2


def test_error_responses_have_one_shape():
    from bonefrac.serving.service import error_response

    response = error_response("too_small", "the image is 16 x 16 pixels")
    assert response.status_code == 422
    assert json.loads(response.body) == {
        "error": {"code": "too_small", "message": "the image is 16 x 16 pixels"}
    }
