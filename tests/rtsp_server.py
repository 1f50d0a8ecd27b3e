"""A real RTSP server for the capture tests: GStreamer's gst-rtsp-server, run by the SYSTEM Python (it needs
PyGObject and the GstRtspServer typelib, Debian packages python3-gi and gir1.2-gst-rtsp-server-1.0, which the
project's virtual environment does not hold). It serves JPEG files (real images) in a loop as RTP/JPEG, pushed
live at FPS like a camera, and prints "ready" once it listens.

    /usr/bin/python3 tests/rtsp_server.py PORT MOUNT FPS FRAME.jpg [FRAME.jpg ...]
    # e.g. 8554 /line 10 a.jpg b.jpg  ->  rtsp://127.0.0.1:8554/line
"""

import sys
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    port, mount, fps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jpegs = [Path(p).read_bytes() for p in sys.argv[4:]]
    Gst.init(None)
    missing = [name for name in ("appsrc", "jpegparse", "rtpjpegpay") if Gst.ElementFactory.find(name) is None]
    if missing:
        print(f"GStreamer elements missing: {', '.join(missing)} (gstreamer1.0-plugins-base/-good/-bad)", flush=True)
        sys.exit(1)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( appsrc name=src is-live=true do-timestamp=true format=time caps="image/jpeg,framerate={fps}/1" '
        "! jpegparse ! rtpjpegpay name=pay0 pt=26 )"
    )
    factory.set_shared(True)
    count = [0]

    def configure(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        src = media.get_element().get_child_by_name("src")

        def push() -> bool:
            data = jpegs[count[0] % len(jpegs)]
            count[0] += 1
            return src.emit("push-buffer", Gst.Buffer.new_wrapped(data)) == Gst.FlowReturn.OK

        GLib.timeout_add(1000 // fps, push)

    factory.connect("media-configure", configure)
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{port}", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
