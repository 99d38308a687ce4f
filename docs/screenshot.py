"""docs/z_image_comfyui_files_2gpu.png: an example workflow in ComfyUI's real frontend, taken by headless Chromium.

    python3 docs/screenshot.py PORT example_workflows/z_image_comfyui_files_2gpu.json docs/z_image_comfyui_files_2gpu.png

Needs a ComfyUI (with this extension in custom_nodes/) listening on 127.0.0.1:PORT, Debian's `chromium` and
`websocket-client`. It opens the page over Chrome's DevTools protocol, loads the workflow through the frontend's
app.loadGraphData, sets the canvas zoom (below about 60% the frontend draws nodes without text) and saves a PNG.
"""
import base64, json, subprocess, sys, time, urllib.request
import websocket  # websocket-client
port, wf, out = sys.argv[1], sys.argv[2], sys.argv[3]
chrome = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=9333",
                           "--window-size=1640,700", "--hide-scrollbars", "about:blank"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(50):
        try:
            tabs = json.load(urllib.request.urlopen("http://127.0.0.1:9333/json")); break
        except Exception:
            time.sleep(0.3)
    page = next(t for t in tabs if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120)
    n = [0]
    def call(method, **params):
        n[0] += 1; ws.send(json.dumps({"id": n[0], "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == n[0]:
                return msg
    call("Emulation.setDeviceMetricsOverride", width=1640, height=700, deviceScaleFactor=1, mobile=False)
    call("Page.navigate", url=f"http://127.0.0.1:{port}/")
    graph = open(wf).read()
    for _ in range(120):
        time.sleep(1)
        r = call("Runtime.evaluate", expression="!!(window.app && window.app.graph && window.app.canvas)", returnByValue=True)
        if r["result"]["result"].get("value"):
            break
    time.sleep(3)
    r = call("Runtime.evaluate", awaitPromise=True, returnByValue=True, expression=f"""
      (async () => {{ await window.app.loadGraphData({graph}); await new Promise(r => setTimeout(r, 2000));
        document.querySelectorAll('.p-dialog-mask, .p-toast').forEach(e => e.remove());
        const cmd = window.app.extensionManager && window.app.extensionManager.command;
        try {{ await cmd.execute('Comfy.Canvas.ToggleMinimap'); }} catch (e) {{}}
        const ns = window.app.graph._nodes, ds = window.app.canvas.ds;
        const minx = Math.min(...ns.map(n => n.pos[0])), miny = Math.min(...ns.map(n => n.pos[1]));
        ds.scale = 0.72; ds.offset[0] = 90 / ds.scale - minx; ds.offset[1] = 130 / ds.scale - miny;
        window.app.canvas.setDirty(true, true);
        await new Promise(r => setTimeout(r, 1000));
        return window.app.graph._nodes.length; }})()""")
    print("nodes:", r["result"])
    time.sleep(2)
    shot = call("Page.captureScreenshot", format="png")
    open(out, "wb").write(base64.b64decode(shot["result"]["data"]))
finally:
    chrome.terminate()
