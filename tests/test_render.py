"""Rendering the course: every email as it would go out, and broken templates caught.

No database: the emails are built with `nurture.preview.preview_message` (the
same Composer the worker uses) or a `Renderer` over a copy of the templates.
"""

from __future__ import annotations

import html as html_lib
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jinja2.sandbox import SecurityError

from nurture import ROOT, tokens
from nurture.config import Settings, load_settings
from nurture.mailer import build_message
from nurture.preview import parts, preview_message
from nurture.render import (
    MAX_HTML_BYTES,
    Renderer,
    RenderError,
    markdown_to_text,
    split_front_matter,
)
from nurture.sequences import SequenceError, load_sequence

TEMPLATES = ROOT / "templates" / "emails"
SEQUENCE = "product-vs-project"
COURSE = load_sequence(TEMPLATES / SEQUENCE)
COURSE_KEYS = [step.key for step in COURSE.steps]
ALL_EMAILS = [*COURSE_KEYS, "confirmation"]

POSTAL_ADDRESS = "Course Team, 12 Test Street, Testville"
COURSE_URL = "https://courses.example.com/six-month"
BASE_URL = "http://nurture.test"
SECRET = "test-secret-key"

HREF = re.compile(r'<a\b[^>]*\bhref="([^"]*)"', re.IGNORECASE)


@pytest.fixture
def render_settings(tmp_path) -> Settings:
    """Settings for rendering only: no database or SMTP server is touched."""
    return load_settings(
        {
            "NURTURE_INSTANCE": str(tmp_path / "instance"),
            "SECRET_KEY": SECRET,
            "BASE_URL": BASE_URL,
            "POSTAL_ADDRESS": POSTAL_ADDRESS,
            "COURSE_URL": COURSE_URL,
            "MAIL_FROM": "Course Team <course@nurture.test>",
        }
    )


def render(settings: Settings, step: str, first_name: str = "Alex"):
    """(message, text, html) for a course step or "confirmation"."""
    message = preview_message(settings, SEQUENCE, step, first_name=first_name)
    text, html = parts(message)
    return message, text, html


def unsubscribe_url() -> str:
    # preview_message renders for a sample subscriber with id 0
    return f"{BASE_URL}/unsubscribe/{tokens.make_unsubscribe_token(SECRET, 0)}"


def hrefs(html: str) -> list[str]:
    return [html_lib.unescape(href) for href in HREF.findall(html)]


# --- Every email -------------------------------------------------------------------


@pytest.mark.parametrize("first_name", ["Alex", ""])
@pytest.mark.parametrize("step", ALL_EMAILS)
def test_every_email_renders_cleanly(render_settings, step, first_name):
    message, text, html = render(render_settings, step, first_name)

    assert message.get_content_type() == "multipart/alternative"
    subject = message["Subject"]
    assert subject.strip()
    assert len(subject) < 78

    # The confirmation never greets by name: whoever filled in the form chose it.
    named = first_name and step != "confirmation"
    greeting = f"Hi {first_name}," if named else "Hi there,"
    assert greeting in text
    assert greeting in html

    # The preheader is in the HTML, hidden, right where inbox previews read it.
    preheader = re.search(r'<div class="preheader"[^>]*>(.*?)</div>', html, re.DOTALL)
    assert preheader and preheader.group(1).strip()

    assert len(html.encode()) < MAX_HTML_BYTES

    for markup in ("**", "](", "{.button}", "###", "{{", "{%"):
        assert markup not in text, f"{markup!r} left in the text part of {step}"

    # Every link of the HTML part is spelled out in the text part.
    links = hrefs(html)
    assert links
    for url in links:
        assert url in text, f"{url} is in the HTML of {step} but not in its text"


@pytest.mark.parametrize("step", ["confirmation", "six-month-course", "last-reminder"])
def test_buttons_are_styled_inline(render_settings, step):
    _, _, html = render(render_settings, step)
    buttons = re.findall(r'<a\b[^>]*class="button"[^>]*>', html)
    assert len(buttons) == 1
    style = re.search(r'style="([^"]*)"', buttons[0])
    assert style, "the button depends on a <style> block that mail clients drop"
    assert "background-color" in style.group(1)
    assert "color: #ffffff" in style.group(1) or "color:#ffffff" in style.group(1)
    assert "<style" not in html


@pytest.mark.parametrize("step", ["confirmation", *COURSE_KEYS])
def test_emails_claim_no_dark_mode_they_do_not_style(render_settings, step):
    """The sent HTML has no <style> block (styles are inlined), so no dark-mode
    rules: declaring "light dark" would tell Apple Mail the email styles its own
    dark mode, and it would then darken what has no colour of its own."""
    _, _, html = render(render_settings, step)
    declared = re.findall(
        r'<meta name="(?:color-scheme|supported-color-schemes)" content="([^"]*)"', html
    )
    assert declared == ["light", "light"]
    assert "prefers-color-scheme" not in html


@pytest.mark.parametrize("step", COURSE_KEYS)
def test_course_email_footer_has_address_and_unsubscribe_link(render_settings, step):
    message, text, html = render(render_settings, step)
    url = unsubscribe_url()

    # "-- " on a line of its own (RFC 3676): mail clients show what follows as the footer.
    before, separator, footer_text = text.rpartition("\n-- \n")
    assert separator and before
    assert POSTAL_ADDRESS in footer_text
    assert url in footer_text

    assert POSTAL_ADDRESS in html
    assert url in hrefs(html)
    assert message["List-Unsubscribe"] == f"<{url}>"


def test_confirmation_email_is_transactional(render_settings):
    message, text, html = render(render_settings, "confirmation")

    assert message["List-Unsubscribe"] is None
    assert message["List-Unsubscribe-Post"] is None
    assert "/unsubscribe/" not in text
    assert "/unsubscribe/" not in html
    assert "nsubscribe" not in text

    confirm = [u for u in hrefs(html) if u.startswith(f"{BASE_URL}/confirm/")]
    assert len(confirm) == 1
    token = confirm[0].rpartition("/")[2]
    assert tokens.read_confirm_token(SECRET, token, max_age=60) == (0, 0)
    assert confirm[0] in text
    assert POSTAL_ADDRESS in text


def test_the_confirmation_email_names_no_one_course(render_settings):
    """Every course's signups get this one email: it must not promise another course's lessons."""
    _, text, html = render(render_settings, "confirmation")

    for part in (text, html):
        assert "product" not in part.lower()
        assert "project" not in part.lower()


# --- What subscribers type ---------------------------------------------------------


@pytest.mark.parametrize(
    "first_name",
    ["<script>alert(1)</script>", "**bold** [x](http://evil)", "_x_ ### `y` {.button}"],
)
@pytest.mark.parametrize("step", ["welcome", "six-month-course", "last-reminder"])
def test_subscriber_values_are_inert_in_html_and_verbatim_in_text(
    render_settings, step, first_name
):
    _, text, html = render(render_settings, step, first_name)

    assert "<script" not in html.lower()
    assert 'href="http://evil' not in html
    assert "<strong>bold</strong>" not in html
    assert "<em>x</em>" not in html
    assert "<h3>" not in html.split("Hi ", 1)[1].split("\n", 1)[0]
    assert all(not url.startswith("http://evil") for url in hrefs(html))
    if first_name.startswith("<script"):
        assert "Hi &lt;script&gt;alert(1)&lt;/script&gt;," in html

    # The text part is not HTML: the name is shown exactly as it was typed.
    assert f"Hi {first_name}," in text


# --- The course itself -------------------------------------------------------------


def test_course_steps_order_and_span():
    assert COURSE_KEYS == [
        "welcome",
        "product-manager",
        "project-manager",
        "overlap",
        "which-fits",
        "six-month-course",
        "last-reminder",
    ]
    assert COURSE.steps[0].day == 0
    assert COURSE.steps[-1].day - COURSE.steps[0].day >= 5
    days = [step.day for step in COURSE.steps]
    assert days == sorted(days)
    assert len(set(days)) == len(days), "two course emails on the same day"


def test_six_month_course_email_sells_the_course(render_settings):
    _, text, html = render(render_settings, "six-month-course")
    lowered = text.lower()
    assert "mentor" in lowered
    assert "curriculum" in lowered
    assert "home" in lowered
    assert "six-month" in lowered
    assert COURSE_URL in text
    assert COURSE_URL in hrefs(html)


@pytest.mark.parametrize("step", COURSE_KEYS)
def test_course_email_has_at_most_one_link(render_settings, step):
    _, text, html = render(render_settings, step)
    content_links = [u for u in hrefs(html) if u != unsubscribe_url()]
    assert len(content_links) <= 1, content_links
    body = text.rpartition("\n-- \n")[0]
    assert len(re.findall(r"https?://", body)) <= 1


# --- Broken templates --------------------------------------------------------------

BROKEN = f"{SEQUENCE}/04-overlap.md"


@pytest.fixture
def templates(tmp_path) -> Path:
    folder = tmp_path / "emails"
    shutil.copytree(TEMPLATES, folder)
    return folder


def replace_line(path: Path, number: int, new: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = new
    path.write_text("\n".join(lines), encoding="utf-8")


def render_copy(templates: Path, name: str = BROKEN):
    renderer = Renderer(templates, postal_address=POSTAL_ADDRESS, course_url=COURSE_URL)
    return renderer.render(
        name,
        {"first_name": "Alex"},
        links={"confirm_url": f"{BASE_URL}/confirm/x"},
        unsubscribe_url=f"{BASE_URL}/unsubscribe/x",
        list_title=COURSE.title,
    )


def test_the_copy_renders_before_it_is_broken(templates):
    assert "Hi Alex," in render_copy(templates).text


def test_undefined_variable_names_file_and_line(templates):
    replace_line(templates / BROKEN, 12, "Hello {{ nickname }}, welcome back.")
    with pytest.raises(RenderError) as caught:
        render_copy(templates)
    message = str(caught.value)
    assert "nickname" in message
    assert re.search(r"04-overlap\.md:12:", message), message


def test_undefined_variable_deep_in_the_file(templates):
    replace_line(templates / BROKEN, 30, "{{ first_name }} {{ missing_value }}")
    with pytest.raises(RenderError) as caught:
        render_copy(templates)
    assert re.search(r"04-overlap\.md:30:", str(caught.value)), str(caught.value)


def test_syntax_error_names_file_and_line(templates):
    replace_line(templates / BROKEN, 12, "Hello {{ first_name ) }}")
    with pytest.raises(RenderError) as caught:
        render_copy(templates)
    assert re.search(r"04-overlap\.md:12:", str(caught.value)), str(caught.value)


def test_missing_front_matter(templates):
    path = templates / BROKEN
    path.write_text(path.read_text(encoding="utf-8").split("---\n", 2)[2], encoding="utf-8")
    with pytest.raises(RenderError) as caught:
        render_copy(templates)
    assert re.search(r"04-overlap\.md:1:", str(caught.value))


def test_missing_subject(templates):
    path = templates / BROKEN
    source = path.read_text(encoding="utf-8")
    path.write_text(re.sub(r"(?m)^subject:.*\n", "", source, count=1), encoding="utf-8")
    with pytest.raises(RenderError) as caught:
        render_copy(templates)
    assert "04-overlap.md" in str(caught.value)
    assert "subject" in str(caught.value)


def test_empty_subject(templates):
    replace_line(templates / BROKEN, 2, "subject:   ")
    with pytest.raises(RenderError, match="subject"):
        render_copy(templates)


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ first_name.__class__.__init__.__globals__ }}",
        "{{ course_url.__class__.__mro__ }}",
    ],
)
def test_sandbox_escape_is_refused(templates, payload):
    replace_line(templates / BROKEN, 12, payload)
    with pytest.raises(RenderError) as caught:
        render_copy(templates)
    assert isinstance(caught.value.__cause__, SecurityError)
    assert "04-overlap.md" in str(caught.value)
    assert "<class" not in str(caught.value)


def test_sandbox_escape_in_subject_is_refused(templates):
    replace_line(templates / BROKEN, 2, "subject: {{ ''.__class__.__mro__ }}")
    with pytest.raises(RenderError) as caught:
        render_copy(templates)
    assert "<class" not in str(caught.value)


# --- Helpers -----------------------------------------------------------------------


def test_split_front_matter_keeps_line_numbers():
    source = "---\nsubject: Hello\npreheader: Soon\n---\nfirst body line\n\nthird {{ x }}\n"
    fields, body = split_front_matter(source, "mail.md")
    assert fields == {"subject": "Hello", "preheader": "Soon"}
    body_lines = body.split("\n")
    source_lines = source.split("\n")
    assert body_lines[4] == source_lines[4] == "first body line"
    assert body_lines[6] == source_lines[6] == "third {{ x }}"
    assert all(not line.strip() for line in body_lines[:4])


def test_split_front_matter_reports_bad_line():
    with pytest.raises(RenderError, match=r"mail\.md:3:"):
        split_front_matter("---\nsubject: Hi\ntitle: oops\n---\nbody\n", "mail.md")


def test_markdown_to_text():
    assert markdown_to_text("[Go](https://x.y){.button}") == "Go: https://x.y\n"
    assert markdown_to_text("Read [the page](https://x.y/a).") == (
        "Read the page (https://x.y/a).\n"
    )
    assert markdown_to_text("### Title\n\n**Day 1:** *easy* and \\*literal\\*") == (
        "TITLE\n\nDay 1: easy and *literal*\n"
    )


# --- Manifest errors ---------------------------------------------------------------


def break_manifest(templates: Path, old: str, new: str) -> Path:
    manifest = templates / SEQUENCE / "sequence.toml"
    source = manifest.read_text(encoding="utf-8")
    assert old in source
    manifest.write_text(source.replace(old, new, 1), encoding="utf-8")
    return manifest


def manifest_line(templates: Path, needle: str) -> int:
    lines = (templates / SEQUENCE / "sequence.toml").read_text(encoding="utf-8").split("\n")
    return next(i for i, line in enumerate(lines, start=1) if needle in line)


def test_the_manifest_copy_loads(templates):
    assert [s.key for s in load_sequence(templates / SEQUENCE).steps] == COURSE_KEYS


def test_manifest_duplicate_key(templates):
    break_manifest(templates, 'key = "overlap"', 'key = "product-manager"')
    lines = (templates / SEQUENCE / "sequence.toml").read_text(encoding="utf-8").split("\n")
    duplicate = [i for i, line in enumerate(lines, 1) if '"product-manager"' in line][1]
    with pytest.raises(SequenceError) as caught:
        load_sequence(templates / SEQUENCE)
    message = str(caught.value)
    assert "product-manager" in message
    # The line of the second use, which is the one to change.
    assert f"sequence.toml:{duplicate}:" in message, message


def test_manifest_day_going_backwards(templates):
    break_manifest(templates, 'key = "overlap"\nday = 3', 'key = "overlap"\nday = 1')
    with pytest.raises(SequenceError) as caught:
        load_sequence(templates / SEQUENCE)
    line = manifest_line(templates, 'key = "overlap"')
    assert re.search(rf"sequence\.toml:({line}|{line + 1}):", str(caught.value)), caught.value
    assert "overlap" in str(caught.value)


def test_manifest_missing_file(templates):
    break_manifest(templates, '"04-overlap.md"', '"04-missing.md"')
    with pytest.raises(SequenceError) as caught:
        load_sequence(templates / SEQUENCE)
    key_line = manifest_line(templates, 'key = "overlap"')
    file_line = manifest_line(templates, '"04-missing.md"')
    match = re.search(r"sequence\.toml:(\d+):", str(caught.value))
    assert match and key_line <= int(match.group(1)) <= file_line, caught.value
    assert "04-missing.md" in str(caught.value)


@pytest.mark.parametrize("bad", ['"25:00"', '"9am"', "9", '"09:00:00"'])
def test_manifest_bad_send_at(templates, bad):
    break_manifest(
        templates,
        'key = "overlap"\nday = 3\nsend_at = "09:00"',
        f'key = "overlap"\nday = 3\nsend_at = {bad}',
    )
    with pytest.raises(SequenceError) as caught:
        load_sequence(templates / SEQUENCE)
    key_line = manifest_line(templates, 'key = "overlap"')
    match = re.search(r"sequence\.toml:(\d+):", str(caught.value))
    assert match and key_line <= int(match.group(1)) <= key_line + 2, caught.value
    assert "send_at" in str(caught.value)


def test_urls_keep_their_underscores_in_the_text_part():
    text = markdown_to_text("[Confirm](https://x.test/confirm/a_b_c_d){.button} and _this_")
    assert text == "Confirm: https://x.test/confirm/a_b_c_d and this\n"


# --- Rendered once, filled in per subscriber ---------------------------------------

AWKWARD_NAMES = [
    "Ann",
    "",
    None,
    "Zoë",
    "O'Brien",
    "A & B",
    "<script>alert(1)</script>",
    "*bold* _it_",
    "a|b",
    "[x](http://evil.example)",
    "http://evil.example/a_b",
    "#1",
    "1. Ann",
    "- Ann",
    "Ann\\",
    "`code`",
    "{{ 7*7 }}",
    "{% raw %}",
    "> quote",
    "Mary  Ann",
    "🚀 Rocket",
    "&amp;",
    "\u00a0Ann",
    " Ann",
    "Ann\t",
    "x" * 80,
]
ALL_STEPS = [
    (f"{sequence.name}/{step.file}", sequence.title)
    for sequence in (COURSE, load_sequence(TEMPLATES / "career-switch-checklist"))
    for step in sequence.steps
]


def course_renderer(templates: Path = TEMPLATES) -> Renderer:
    return Renderer(templates, postal_address=POSTAL_ADDRESS, course_url=COURSE_URL)


@pytest.mark.parametrize(("name", "title"), ALL_STEPS)
def test_filling_in_gives_exactly_the_full_render(name, title):
    renderer = course_renderer()
    unsubscribe = f"{BASE_URL}/unsubscribe/AbC_d-9.e"
    for first_name in AWKWARD_NAMES:
        values = {"first_name": first_name}
        filled = renderer.render(name, values, unsubscribe_url=unsubscribe, list_title=title)
        full = renderer._render_fully(name, values, unsubscribe_url=unsubscribe, list_title=title)
        assert filled == full, first_name
    # The shipped emails really take the quick path, so the comparison above means something.
    assert renderer._shape(name, {"first_name": "Ann"}, True, title) is not None
    assert renderer._shape(name, {"first_name": ""}, True, title) is not None


def test_a_shape_knows_whether_its_html_holds_raw_text(templates):
    """The mailer writes non-ASCII as references only outside raw text; a shape tells it
    whether it need look, and is right both ways."""
    values = {"first_name": "Ann"}
    shipped = course_renderer(templates).render(BROKEN, values, unsubscribe_url=f"{BASE_URL}/u/x")
    assert shipped.raw_text_free is True
    html_part = html_part_of(shipped)
    assert html_part["Content-Transfer-Encoding"] == "7bit"
    assert "&#8212;" in html_part.get_content() or "&#8220;" in html_part.get_content()

    layout = templates / "_layout.html"
    script = '<script>var mark = "—";</script>'
    layout.write_text(layout.read_text().replace("</body>", f"{script}</body>"))
    scripted = course_renderer(templates).render(BROKEN, values, unsubscribe_url=f"{BASE_URL}/u/x")
    assert scripted.raw_text_free is False
    html_part = html_part_of(scripted)
    assert html_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert script in html_part.get_content()


def html_part_of(rendered):
    email = build_message(
        rendered,
        to_email="ann@example.com",
        to_name="Ann",
        mail_from="Course <course@example.com>",
        message_id="<1@example.com>",
        step_label="x",
        date=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return email.message().get_body(("html",))


def test_a_value_used_through_a_filter_renders_in_full(templates):
    replace_line(templates / BROKEN, 5, "Hi {{ first_name|upper }},")
    renderer = course_renderer(templates)

    email = renderer.render(BROKEN, {"first_name": "ann"}, list_title=COURSE.title)

    assert "Hi ANN," in email.text
    assert renderer._shape(BROKEN, {"first_name": "ann"}, False, COURSE.title) is None


def test_an_edit_shows_in_the_next_email(templates):
    renderer = course_renderer(templates)
    assert "Hi Ann," in renderer.render(BROKEN, {"first_name": "Ann"}).text
    path = templates / BROKEN
    replace_line(path, 5, "Hello again {{ first_name or 'there' }},")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))

    assert "Hello again Ann," in renderer.render(BROKEN, {"first_name": "Ann"}).text


def test_an_edit_made_while_a_batch_is_composed_shows_in_the_next_batch(templates):
    renderer = course_renderer(templates)
    path = templates / BROKEN
    with renderer.one_version():
        assert "Hi Ann," in renderer.render(BROKEN, {"first_name": "Ann"}).text
        with renderer.one_version():  # a block inside keeps the outer one's files
            assert "Hi Bob," in renderer.render(BROKEN, {"first_name": "Bob"}).text
        replace_line(path, 5, "Hello again {{ first_name or 'there' }},")
        bump_mtime(path)
        assert "Hi Cy," in renderer.render(BROKEN, {"first_name": "Cy"}).text
        # A shape made meanwhile (another emptiness) is made from the files as they are.
        assert "Hello again there," in renderer.render(BROKEN, {"first_name": ""}).text

    assert "Hello again Di," in renderer.render(BROKEN, {"first_name": "Di"}).text
    with renderer.one_version():
        assert "Hello again Ed," in renderer.render(BROKEN, {"first_name": "Ed"}).text


def test_a_broken_email_is_reported_on_the_quick_path_too(templates):
    renderer = course_renderer(templates)
    renderer.render(BROKEN, {"first_name": "Ann"})  # a good shape is cached
    path = templates / BROKEN
    replace_line(path, 12, "Hello {{ nickname }}, welcome back.")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))

    with pytest.raises(RenderError, match=r"04-overlap\.md:12:.*nickname"):
        renderer.render(BROKEN, {"first_name": "Ann"})


def test_a_name_in_the_subject_is_filled_in_too(templates):
    replace_line(templates / BROKEN, 2, "subject: Day 3 for {{ first_name or 'you' }}: the overlap")
    renderer = course_renderer(templates)

    for first_name in ["Ann", "Mary  Ann", "A & <B>", ""]:
        values = {"first_name": first_name}
        assert renderer.render(BROKEN, values) == renderer._render_fully(BROKEN, values)
    assert renderer.render(BROKEN, {"first_name": "Mary  Ann"}).subject == (
        "Day 3 for Mary Ann: the overlap"
    )
    assert renderer._shape(BROKEN, {"first_name": "Ann"}, False, "") is not None


def bump_mtime(path: Path) -> None:
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


BOB_MACRO = "{% macro m() %}{{ first_name }}{% endmacro %}"
SNIPPET = "_snippets/greeting.md"


@pytest.mark.parametrize(
    ("line", "snippet"),
    [
        # A value read in an imported file (with context) or the file an email extends.
        (
            f'{{% from "{SNIPPET}" import greeting with context %}}{{{{ greeting }}}},',
            '{% set greeting = "Yo Bob" if first_name == "Bob" else "Hello" %}',
        ),
        # Output captured and compared: a set block, a macro, a block through self, caller().
        ('{% set x %}{{ first_name }}{% endset %}{% if x == "Bob" %}Yo{% endif %} Hi,', None),
        (BOB_MACRO + '{% if m() == "Bob" %}Yo{% endif %} Hi,', None),
        (
            '{% block n %}{{ first_name }}{% endblock %}{% if self.n() == "Bob" %}Yo{% endif %},',
            None,
        ),
        (
            '{% macro m() %}{% if caller() == "Bob" %}Yo{% endif %}{% endmacro %}'
            "{% call m() %}{{ first_name }}{% endcall %} Hi,",
            None,
        ),
    ],
)
def test_a_value_whose_output_is_looked_at_again_renders_in_full(templates, line, snippet):
    if snippet is not None:
        (templates / SNIPPET).write_text(snippet, encoding="utf-8")
    replace_line(templates / BROKEN, 5, line)
    renderer = course_renderer(templates)

    for first_name in ["Ann", "Bob"]:
        values = {"first_name": first_name}
        assert renderer.render(BROKEN, values) == renderer._render_fully(BROKEN, values)


def test_an_email_that_extends_a_file_is_checked_through_it(templates):
    (templates / SNIPPET).write_text(
        '{% block top %}{% endblock %}\n\n{% if first_name == "Bob" %}Yo Bob{% endif %}',
        encoding="utf-8",
    )
    path = templates / BROKEN
    head = path.read_text(encoding="utf-8").split("\n")[:4]
    path.write_text(
        "\n".join([*head, f'{{% extends "{SNIPPET}" %}}{{% block top %}}Hi{{% endblock %}}']),
        encoding="utf-8",
    )
    renderer = course_renderer(templates)

    for first_name in ["Ann", "Bob"]:
        values = {"first_name": first_name}
        assert renderer.render(BROKEN, values) == renderer._render_fully(BROKEN, values)


def test_an_edit_to_an_imported_file_shows_in_the_next_email(templates):
    snippet = templates / SNIPPET
    snippet.write_text('{% set greeting = "Hello" %}', encoding="utf-8")
    replace_line(
        templates / BROKEN, 5, f'{{% from "{SNIPPET}" import greeting %}}{{{{ greeting }}}},'
    )
    renderer = course_renderer(templates)
    assert "Hello," in renderer.render(BROKEN, {"first_name": "Ann"}).text

    snippet.write_text('{% set greeting = "Goodbye" %}', encoding="utf-8")
    bump_mtime(snippet)

    assert "Goodbye," in renderer.render(BROKEN, {"first_name": "Ann"}).text


def test_values_that_filling_in_cannot_reproduce_render_in_full(templates):
    replace_line(templates / BROKEN, 5, "Hi there,\n{{ first_name }}")
    renderer = course_renderer(templates)
    unsubscribe = f"{BASE_URL}/unsubscribe/AbC_d-9.e"
    names = ["Ann", "===", "https://nurtureslot.invalid/unsubscribe", "nurtureslot0x", "", None, ""]
    for first_name in names:
        values = {"first_name": first_name}
        filled = renderer.render(BROKEN, values, unsubscribe_url=unsubscribe, list_title="T")
        full = renderer._render_fully(BROKEN, values, unsubscribe_url=unsubscribe, list_title="T")
        assert filled == full, first_name


def test_a_file_newly_included_by_a_snippet_is_part_of_the_email(templates):
    outer, inner = templates / "_snippets/outer.md", templates / "_snippets/inner.md"
    outer.write_text("Outer.", encoding="utf-8")
    inner.write_text("Inner one.", encoding="utf-8")
    replace_line(templates / BROKEN, 5, 'Hi {{ first_name }}, {% include "_snippets/outer.md" %}')
    renderer = course_renderer(templates)
    assert "Outer." in renderer.render(BROKEN, {"first_name": "Ann"}).text

    # The snippet now includes another file: edits to that one show too...
    outer.write_text('Outer. {% include "_snippets/inner.md" %}', encoding="utf-8")
    bump_mtime(outer)
    assert "Outer. Inner one." in renderer.render(BROKEN, {"first_name": "Ann"}).text
    inner.write_text("Inner two.", encoding="utf-8")
    bump_mtime(inner)
    assert "Outer. Inner two." in renderer.render(BROKEN, {"first_name": "Ann"}).text

    # ... and its uses of a value are checked like the email's own.
    inner.write_text('{% if first_name == "Bob" %}Yo Bob.{% endif %}', encoding="utf-8")
    bump_mtime(inner)
    for first_name in ["Ann", "Bob"]:
        values = {"first_name": first_name}
        assert renderer.render(BROKEN, values) == renderer._render_fully(BROKEN, values)
