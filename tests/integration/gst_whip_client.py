"""A WHIP client on GStreamer's webrtcbin: an independent WebRTC stack against the transceiver.

Run with the system Python (Debian's python3-gst-1.0, GStreamer 1.22), not the
project's venv: `python3 gst_whip_client.py URL [--seconds S]`. It sends a
440 Hz tone as Opus (audiotestsrc ! opusenc ! rtpopuspay) through webrtcbin
(libnice for ICE, its own DTLS with an RSA certificate), POSTs the offer as
`application/sdp` the way WHIP clients (simple-whip-client) do, applies the
answer, and listens to what comes back: the echo backend returns the tone,
which a `level` element measures. It prints one JSON line: the ICE and peer
connection states reached, how many 100 ms level reports came back above
-30 dBFS, the loudest, and the HTTP status of the DELETE that ends the call.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

PIPELINE = (
    "audiotestsrc is-live=true wave=sine freq=440 volume=0.4 ! audioconvert ! audioresample"
    " ! opusenc frame-size=20 ! rtpopuspay pt=111"
    " ! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000"
    " ! webrtcbin name=w bundle-policy=max-bundle"
)
LOUD_DB = -30.0


class WhipClient:
    def __init__(self, url: str, seconds: float) -> None:
        self.url = url
        self.seconds = seconds
        self.loop = GLib.MainLoop()
        self.pipe = Gst.parse_launch(PIPELINE)
        self.webrtc = self.pipe.get_by_name("w")
        self.result: dict[str, Any] = {
            "ice_states": [],
            "connection_states": [],
            "answer_status": None,
            "loud_reports": 0,
            "peak_db": None,
            "delete_status": None,
            "error": None,
        }
        self.location: str | None = None
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("pad-added", self._on_pad_added)
        self.webrtc.connect("notify::ice-connection-state", self._on_ice_state)
        self.webrtc.connect("notify::connection-state", self._on_connection_state)
        bus = self.pipe.get_bus()
        bus.add_signal_watch()
        bus.connect("message", self._on_message)

    # -- signaling

    def _on_negotiation_needed(self, element: Any) -> None:
        promise = Gst.Promise.new_with_change_func(self._on_offer_created, element, None)
        element.emit("create-offer", None, promise)

    def _on_offer_created(self, promise: Any, element: Any, _data: Any) -> None:
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer") if reply is not None else None
        if offer is None:
            detail = reply.to_string() if reply is not None else "no reply"
            self.result["error"] = f"webrtcbin made no offer: {detail}"
            GLib.idle_add(self.loop.quit)
            return
        element.emit("set-local-description", offer, Gst.Promise.new())
        # Gathering is not awaited: the transceiver learns the client's addresses from
        # its checks (peer-reflexive); the offer's own candidates are ignored there.
        sdp = offer.sdp.as_text()
        GLib.idle_add(self._post_offer, sdp)

    def _post_offer(self, sdp: str) -> bool:
        request = urllib.request.Request(
            self.url, data=sdp.encode(), headers={"Content-Type": "application/sdp"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                self.result["answer_status"] = resp.status
                self.location = resp.headers.get("Location")
                answer_text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            self.result["answer_status"] = exc.code
            self.result["error"] = exc.read().decode(errors="replace")[:300]
            self.loop.quit()
            return False
        except OSError as exc:
            self.result["error"] = f"POST failed: {exc}"
            self.loop.quit()
            return False
        ok, message = GstSdp.SDPMessage.new_from_text(answer_text)
        if ok != GstSdp.SDPResult.OK:
            self.result["error"] = "the answer does not parse as SDP"
            self.loop.quit()
            return False
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())
        return False

    # -- media back

    def _on_pad_added(self, element: Any, pad: Any) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        tail = Gst.parse_bin_from_description(
            "rtpopusdepay ! opusdec ! audioconvert ! level interval=100000000 post-messages=true"
            " ! fakesink sync=false",
            True,
        )
        self.pipe.add(tail)
        tail.sync_state_with_parent()
        pad.link(tail.get_static_pad("sink"))

    def _on_message(self, bus: Any, message: Any) -> None:
        if message.type == Gst.MessageType.ERROR:
            err, debug = message.parse_error()
            self.result["error"] = f"{err.message} ({debug})"[:300]
            self.loop.quit()
        elif message.type == Gst.MessageType.ELEMENT:
            structure = message.get_structure()
            if structure is not None and structure.get_name() == "level":
                peaks = structure.get_value("peak")
                peak = max(peaks) if peaks else -200.0
                current = self.result["peak_db"]
                self.result["peak_db"] = peak if current is None else max(current, peak)
                if peak > LOUD_DB:
                    self.result["loud_reports"] += 1

    def _on_ice_state(self, element: Any, _spec: Any) -> None:
        state = element.get_property("ice-connection-state").value_nick
        self.result["ice_states"].append(state)

    def _on_connection_state(self, element: Any, _spec: Any) -> None:
        state = element.get_property("connection-state").value_nick
        self.result["connection_states"].append(state)

    # -- run

    def run(self) -> dict[str, Any]:
        self.pipe.set_state(Gst.State.PLAYING)
        GLib.timeout_add(int(self.seconds * 1000), self.loop.quit)
        self.loop.run()
        self.pipe.set_state(Gst.State.NULL)
        if self.location:
            target = urllib.parse.urljoin(self.url, self.location)
            request = urllib.request.Request(target, method="DELETE")
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    self.result["delete_status"] = resp.status
            except urllib.error.HTTPError as exc:
                self.result["delete_status"] = exc.code
            except OSError as exc:
                self.result["delete_status"] = str(exc)
        return self.result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    Gst.init(None)
    result = WhipClient(args.url, args.seconds).run()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
