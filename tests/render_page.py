"""Open an HTML page in headless Chromium (Qt WebEngine, offscreen) and print, as JSON, what the
browser made of it: every image's alt text and rendered size, and the number of table rows.

    python tests/render_page.py page.html
"""

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Chromium refuses to run as root inside its sandbox; CI containers run as root
os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox --disable-gpu")

from PySide6.QtCore import QTimer, QUrl  # noqa: E402
from PySide6.QtWebEngineCore import QWebEnginePage  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

PROBE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                                  width: i.naturalWidth, height: i.naturalHeight})),
  rows: document.querySelectorAll("tbody tr, table tr").length,
  title: document.title})"""


def main(path):
    app = QApplication([])
    page = QWebEnginePage()
    result = {}

    def loaded(ok):
        if not ok:
            result["error"] = "page did not load"
            app.quit()
            return
        page.runJavaScript(PROBE, 0, lambda text: (result.update(json.loads(text)), app.quit()))

    page.loadFinished.connect(loaded)
    page.load(QUrl.fromLocalFile(os.path.abspath(path)))
    QTimer.singleShot(60000, app.quit)  # never hang a test run
    app.exec()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
