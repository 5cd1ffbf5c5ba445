"""Drive headless Chromium over the DevTools protocol with Python's standard library alone.

Chromium's `--remote-debugging-pipe` speaks the protocol over file descriptors 3 (commands in)
and 4 (replies and events out), each message a JSON text ended by a NUL byte, so no WebSocket
client is needed.
"""
import base64, fcntl, json, os, subprocess, threading, time, zlib

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--disable-quic", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--force-device-scale-factor=1"]


class CDPError(RuntimeError):
    pass


class Chromium:
    def __init__(self, exe, user_data_dir, width=1280, height=900, log_path=os.devnull):
        cmd_r, cmd_w = os.pipe()   # we write commands to cmd_w; Chromium reads them on fd 3
        out_r, out_w = os.pipe()   # Chromium writes on fd 4; we read out_r
        # Keep the child's ends away from 3 and 4 so the dup2s below cannot clobber them.
        child_in = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(out_w)

        def pre():
            os.dup2(child_in, 3)   # os.dup2 makes 3 and 4 inheritable; everything else stays CLOEXEC
            os.dup2(child_out, 4)

        self.log = open(log_path, "ab")
        args = [exe] + FLAGS + ["--user-data-dir=" + user_data_dir, "--window-size=%d,%d" % (width, height),
                                "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     preexec_fn=pre, close_fds=False, start_new_session=True)
        os.close(child_in)
        os.close(child_out)
        self.wfd = cmd_w
        self.rfd = out_r
        self.next_id = 1
        self.replies = {}
        self.events = []
        self.cv = threading.Condition()
        self.closed = False
        self.wlock = threading.Lock()
        threading.Thread(target=self._reader, daemon=True).start()
        self.width, self.height = width, height
        self.session = None

    def _reader(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self.cv:
                    self.closed = True
                    self.cv.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self.cv:
                    if "id" in msg:
                        self.replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                        del self.events[:-500]
                    self.cv.notify_all()

    def send(self, method, params=None, session=True, timeout=30.0):
        with self.wlock:
            i = self.next_id
            self.next_id += 1
            msg = {"id": i, "method": method, "params": params or {}}
            if session and self.session:
                msg["sessionId"] = self.session
            data = json.dumps(msg).encode() + b"\0"
            while data:
                data = data[os.write(self.wfd, data):]
        deadline = time.monotonic() + timeout
        with self.cv:
            while i not in self.replies:
                if self.closed:
                    raise CDPError("chromium closed the pipe during " + method)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CDPError("timed out waiting for " + method)
                self.cv.wait(left)
            reply = self.replies.pop(i)
        if "error" in reply:
            raise CDPError("%s: %s" % (method, reply["error"]))
        return reply.get("result", {})

    def open(self, url):
        """Opens url in a fresh page target and attaches to it."""
        tid = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": tid, "flatten": True}, session=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.navigate", {"url": url})

    def eval(self, expr, timeout=15.0):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                      timeout=timeout)
        if "exceptionDetails" in r:
            raise CDPError("page threw: %s" % json.dumps(r["exceptionDetails"])[:500])
        return r["result"].get("value")

    def wait_for(self, expr, timeout=20.0, interval=0.2):
        deadline = time.monotonic() + timeout
        while True:
            v = self.eval(expr)
            if v:
                return v
            if time.monotonic() > deadline:
                raise CDPError("timed out waiting for: " + expr)
            time.sleep(interval)

    def screenshot(self, clip=None):
        p = {"format": "png"}
        if clip:
            p["clip"] = dict(clip, scale=1)
        return base64.b64decode(self.send("Page.captureScreenshot", p, timeout=30)["data"])

    def console_errors(self):
        with self.cv:
            return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                    or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")]

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        for fd in (self.wfd,):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


def decode_png(data):
    """Returns (width, height, rows) for an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium
    writes); rows is a list of bytes objects with 3 or 4 bytes per pixel, and also the channel count."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w = 8, [], None
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        typ = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if typ == b"IHDR":
            w, h = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            depth, ctype, interlace = body[8], body[9], body[12]
            assert depth == 8 and ctype in (2, 6) and interlace == 0, "unsupported PNG %d/%d/%d" % (depth, ctype, interlace)
            bpp = 3 if ctype == 2 else 4
        elif typ == b"IDAT":
            idat.append(body)
        elif typ == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 255
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, rows, bpp


def count_color(png, rgb, tol=40):
    """How many pixels of the PNG lie within tol (per channel) of the colour rgb."""
    w, h, rows, bpp = decode_png(png)
    r0, g0, b0 = rgb
    n = 0
    for row in rows:
        for i in range(0, w * bpp, bpp):
            if abs(row[i] - r0) <= tol and abs(row[i + 1] - g0) <= tol and abs(row[i + 2] - b0) <= tol:
                n += 1
    return n
