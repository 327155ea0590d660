#!/usr/bin/env python3
"""Draws the example job's three keyframes (320x192 PNG) with the standard
library only: a sunrise over the sea, green hills at noon, a city at night.
Deterministic; run it from anywhere: python3 examples/make-keyframes.py"""
import math
import os
import random
import struct
import zlib

W, H = 320, 192
HERE = os.path.dirname(os.path.abspath(__file__))


def png(path, pixels):
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in pixels)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def lerp(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def sunrise():
    horizon = 118
    img = []
    for y in range(H):
        row = []
        for x in range(W):
            if y < horizon:
                c = lerp((255, 170, 90), (70, 60, 140), 1 - y / horizon)
                d = math.hypot(x - 200, y - horizon + 10)
                if d < 26:
                    c = (255, 236, 170)
                elif d < 60:
                    c = lerp((255, 220, 150), c, (d - 26) / 34)
            else:
                t = (y - horizon) / (H - horizon)
                c = lerp((230, 130, 90), (20, 40, 90), t)
                if abs(x - 200) < 30 * (1 - t) + 4 and (y // 3) % 2 == 0:
                    c = lerp(c, (255, 220, 150), 0.6)
            row.append(c)
        img.append(row)
    return img


def hills():
    img = []
    for y in range(H):
        row = []
        for x in range(W):
            c = lerp((120, 180, 250), (200, 230, 255), y / H)
            far = 100 + 18 * math.sin(x / 37.0) + 8 * math.sin(x / 11.0)
            near = 135 + 22 * math.sin(x / 53.0 + 1.3)
            if y > far:
                c = (90, 150, 90)
            if y > near:
                c = lerp((60, 160, 60), (40, 110, 40), (y - near) / (H - near + 1))
            # a tree
            if 245 < x < 253 and 120 < y < 150:
                c = (90, 60, 30)
            if math.hypot(x - 249, y - 112) < 16:
                c = (30, 110, 40)
            # a cloud
            if math.hypot(x - 80, y - 40) < 14 or math.hypot(x - 98, y - 36) < 18 or math.hypot(x - 116, y - 42) < 12:
                c = (250, 250, 250)
            row.append(c)
        img.append(row)
    return img


def city():
    rng = random.Random(7)
    stars = {(rng.randrange(W), rng.randrange(100)) for _ in range(90)}
    buildings = []
    x = 0
    while x < W:
        w = rng.randrange(22, 46)
        buildings.append((x, x + w, rng.randrange(70, 150)))
        x += w + rng.randrange(0, 6)
    img = []
    for y in range(H):
        row = []
        for x in range(W):
            c = lerp((10, 12, 40), (40, 30, 80), y / H)
            if (x, y) in stars:
                c = (230, 230, 255)
            if math.hypot(x - 60, y - 36) < 14:
                c = (245, 245, 220)
            for x0, x1, top in buildings:
                if x0 <= x < x1 and y >= H - top:
                    c = (25, 25, 35)
                    if (x - x0) % 8 in (3, 4) and (y - (H - top)) % 10 in (4, 5, 6) and (x * 7 + y * 13) % 5 < 3:
                        c = (250, 210, 110)
            row.append(c)
        img.append(row)
    return img


if __name__ == "__main__":
    out = os.path.join(HERE, "keyframes")
    os.makedirs(out, exist_ok=True)
    for name, draw in [("01-sunrise.png", sunrise), ("02-hills.png", hills), ("03-city.png", city)]:
        png(os.path.join(out, name), draw())
        print("wrote", os.path.join(out, name))
