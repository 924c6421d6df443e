"""The pages in a real browser: Debian's Chromium driven by Playwright, with axe-core.

The real app runs in a background thread (werkzeug's server) on a real database.
Screenshots of each page go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REQUIRE_SERVICES, free_port
from sqlalchemy import select
from werkzeug.serving import make_server

from nurture import ROOT
from nurture.db import session_scope
from nurture.models import Consent, Subscriber
from nurture.tokens import make_confirm_token, make_unsubscribe_token
from nurture.users import add_user

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
ADMIN = "admin@example.com"
PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def server(app) -> Iterator[str]:
    """The real app, served over HTTP from a background thread; its base URL."""
    app.config["TESTING"] = False
    http = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(timezone_id="Asia/Tokyo")
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def subscriber(settings, email: str) -> Subscriber | None:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Subscriber).where(Subscriber.email == email))


def make_admin(settings) -> None:
    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD, "admin")


def log_in(page, server: str) -> None:
    page.goto(f"{server}/admin/login")
    page.fill("#email", ADMIN)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server}/admin/")


def serious_violations(page) -> list[dict]:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    found = [
        v for v in results.response["violations"] if v.get("impact") in ("serious", "critical")
    ]
    for violation in found:
        targets = [node["target"] for node in violation["nodes"]]
        print(
            f"{page.url}: {violation['id']} ({violation['impact']}): {violation['help']} {targets}"
        )
    return found


# --- (a, b) signup and confirmation -------------------------------------------------


def test_signup_fills_the_timezone_and_confirmation_works(page, server, settings):
    page.goto(f"{server}/")
    shot(page, "landing")
    assert page.input_value("#timezone") == "Asia/Tokyo"
    page.fill("#email", "ann@example.com")
    page.fill("#first_name", "Ann")
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Check your inbox')")
    shot(page, "thanks")

    ann = subscriber(settings, "ann@example.com")
    assert (ann.timezone, ann.first_name, ann.status) == ("Asia/Tokyo", "Ann", "pending")

    with session_scope(settings.database_url) as session:
        consent_id = session.scalar(select(Consent.id).where(Consent.subscriber_id == ann.id))
    page.goto(f"{server}/confirm/{make_confirm_token(settings.secret_key, ann.id, consent_id)}")
    assert page.locator("h1").inner_text() == "You are in"
    shot(page, "confirmed")
    assert subscriber(settings, "ann@example.com").status == "active"


# --- (c) the admin pages ------------------------------------------------------------


def test_admin_login_dashboard_preview_and_subscriber(page, server, settings):
    make_admin(settings)
    page.goto(f"{server}/")
    page.fill("#email", "bob@example.com")
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Check your inbox')")
    bob = subscriber(settings, "bob@example.com")

    page.goto(f"{server}/admin/login")
    shot(page, "admin-login")
    log_in(page, server)
    assert page.locator("svg.funnel").count() >= 1
    shot(page, "dashboard")

    page.goto(f"{server}/admin/preview/product-vs-project/welcome")
    assert page.locator("iframe[title='HTML part']").count() == 1
    # The email itself shows in its frame (the pages' frame-ancestors policy is for others).
    preview = page.frame_locator("iframe[title='HTML part']")
    assert "Hi Alex" in preview.locator("body").inner_text()
    shot(page, "preview")

    page.goto(f"{server}/admin/subscribers/{bob.id}")
    assert page.locator("h2:has-text('Consent')").is_visible()
    assert page.locator("h2:has-text('Timeline')").is_visible()
    assert "bob@example.com" in page.content()
    shot(page, "subscriber")


# --- (d) without JavaScript ---------------------------------------------------------


def test_pages_work_without_javascript(browser, server, settings):
    make_admin(settings)
    context = browser.new_context(java_script_enabled=False, timezone_id="Asia/Tokyo")
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(f"{server}/")
        assert page.input_value("#timezone") == ""
        page.fill("#email", "cy@example.com")
        page.click("button[type=submit]")
        page.wait_for_selector("h1:has-text('Check your inbox')")
        shot(page, "thanks-no-js")
        assert subscriber(settings, "cy@example.com").timezone == "UTC"

        log_in(page, server)
        assert page.locator("h1").inner_text() == "Dashboard"
        shot(page, "dashboard-no-js")
    finally:
        context.close()


# --- (e) accessibility and the keyboard ---------------------------------------------


def test_no_serious_accessibility_violations(page, server, settings):
    make_admin(settings)
    found = {}
    page.goto(f"{server}/")
    found["landing"] = serious_violations(page)
    page.fill("#email", "dee@example.com")
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Check your inbox')")
    found["thanks"] = serious_violations(page)

    dee = subscriber(settings, "dee@example.com")
    page.goto(f"{server}/unsubscribe/{make_unsubscribe_token(settings.secret_key, dee.id)}")
    shot(page, "unsubscribe")
    found["unsubscribe"] = serious_violations(page)

    page.goto(f"{server}/admin/login")
    found["admin-login"] = serious_violations(page)
    log_in(page, server)
    found["dashboard"] = serious_violations(page)

    assert {name: [v["id"] for v in vs] for name, vs in found.items() if vs} == {}


def test_a_subscriber_pauses_and_resumes_from_the_footer_link(page, server, settings):
    """The footer link's page, then the paused page's "resume now": both work by
    their buttons in a real browser and pass axe's serious checks."""
    page.goto(f"{server}/")
    page.fill("#email", "eve@example.com")
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Check your inbox')")
    eve = subscriber(settings, "eve@example.com")
    with session_scope(settings.database_url) as session:
        consent_id = session.scalar(select(Consent.id).where(Consent.subscriber_id == eve.id))
    page.goto(f"{server}/confirm/{make_confirm_token(settings.secret_key, eve.id, consent_id)}")
    assert page.locator("h1").inner_text() == "You are in"

    page.goto(f"{server}/unsubscribe/{make_unsubscribe_token(settings.secret_key, eve.id)}")
    page.click("button[value=pause]")
    page.wait_for_selector("h1:has-text('Your course is paused')")
    shot(page, "paused")
    found = {"paused": serious_violations(page)}
    page.click("button[value=resume]")
    page.wait_for_selector("h1:has-text('Your course continues')")
    shot(page, "resumed")
    found["resumed"] = serious_violations(page)

    assert page.title().startswith("Course resumed")
    assert {name: [v["id"] for v in vs] for name, vs in found.items() if vs} == {}
    assert subscriber(settings, "eve@example.com").status == "active"


def test_keyboard_reaches_the_form_in_order_and_enter_submits(page, server, settings):
    page.goto(f"{server}/")
    order = []
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    assert order == ["email", "first_name", "BUTTON"]

    page.focus("#email")
    page.keyboard.type("eve@example.com")
    page.keyboard.press("Enter")
    page.wait_for_selector("h1:has-text('Check your inbox')")
    assert subscriber(settings, "eve@example.com") is not None


def _contrast(first: str, second: str) -> float:
    """WCAG contrast ratio of two CSS colours given as `rgb(r, g, b)`."""

    def luminance(css: str) -> float:
        red, green, blue = (int(part) / 255 for part in css[css.index("(") + 1 : -1].split(",")[:3])
        linear = [
            c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (red, green, blue)
        ]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    lighter, darker = sorted((luminance(first), luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_focus_ring_stands_out_from_the_page(page, server):
    """WCAG 1.4.11: the focus indicator needs 3:1 against the background it sits on."""
    page.goto(f"{server}/")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    for selector in ("#email", "#first_name", "button[type=submit]"):
        page.focus(selector)
        style = page.eval_on_selector(
            selector,
            "e => { const s = getComputedStyle(e); return [s.outlineStyle, s.outlineColor]; }",
        )
        assert style[0] != "none", selector
        assert _contrast(style[1], background) >= 3, (selector, style[1], background)


def test_text_boxes_are_outlined_clearly_enough_to_find(page, server):
    """WCAG 1.4.11: a text box's border needs 3:1 against the page and against the box."""
    page.goto(f"{server}/")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    for selector in ("#email", "#first_name"):
        border, fill = page.eval_on_selector(
            selector,
            "e => { const s = getComputedStyle(e); return [s.borderTopColor, s.backgroundColor]; }",
        )
        assert _contrast(border, background) >= 3, (selector, border, background)
        assert _contrast(border, fill) >= 3, (selector, border, fill)


def test_a_refused_form_says_so_in_its_title_and_focuses_the_field_to_fix(page, server):
    """WCAG 3.3.1 and 2.4.3: after a 422 the keyboard and screen reader start at the error."""
    page.goto(f"{server}/")
    page.fill("#email", "ann@example.com")
    page.fill("#first_name", "<Ann>")
    page.click("button[type=submit]")
    page.wait_for_selector("#first-name-error")

    assert page.title().startswith("Error: ")
    assert page.evaluate("document.activeElement.id") == "first_name"

    page.fill("#email", "")
    page.click("button[type=submit]")
    page.wait_for_selector("#email-error")
    assert page.evaluate("document.activeElement.id") == "email"

    page.goto(f"{server}/confirm/not-a-token")
    page.fill("#email", "not an address")
    page.click("button[type=submit]")
    page.wait_for_selector("#email-error")
    assert page.title().startswith("Error: ")
    assert page.evaluate("document.activeElement.id") == "email"
