"""How the reference values hard-coded in tests/test_metrics.py were produced (not a test).

Needs scikit-image and opencv-python-headless, which the package and its tests do not:
    pip install --target /tmp/xcheck scikit-image opencv-python-headless
    PYTHONPATH=/tmp/xcheck python tests/make_metric_references.py
It builds a seeded uint8 pair (numpy RandomState, a frozen stream) and scores it with
skimage.metrics and with the formulas of the authors' release (V-Bridge/eval.py: cv2 Gaussian
window, MATLAB rgb2ycbcr luma, per-channel PSNR mean), then with vbridge_core.metrics.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, cv2, torch
from skimage.metrics import structural_similarity, peak_signal_noise_ratio
from vbridge_core.metrics import psnr, ssim

def make_pair(seed=1234, h=48, w=40):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 60*np.sin(xx/5 + c) + 40*np.cos(yy/7 - c) for c in range(3)], -1)
    ref = np.clip(np.rint(base + rs.normal(0, 10, base.shape)), 0, 255).astype(np.uint8)
    dist = np.clip(np.rint(ref + rs.normal(0, 12, base.shape)), 0, 255).astype(np.uint8)
    return ref, dist

def y(img):
    img = img.astype(np.float64); return 16 + (65.481*img[...,0] + 128.553*img[...,1] + 24.966*img[...,2]) / 255

def mssim(a, b):  # release eval.py formula
    a=a.astype(np.float64); b=b.astype(np.float64); C1=(0.01*255)**2; C2=(0.03*255)**2
    k=cv2.getGaussianKernel(11,1.5); win=k@k.T; win/=win.sum()
    f=lambda t: cv2.filter2D(t,-1,win,borderType=cv2.BORDER_CONSTANT)[5:-5,5:-5]
    m1,m2=f(a),f(b); s1=f(a*a)-m1*m1; s2=f(b*b)-m2*m2; s12=f(a*b)-m1*m2
    return np.mean(((2*m1*m2+C1)*(2*s12+C2))/((m1*m1+m2*m2+C1)*(s1+s2+C2)))

def mpsnr(a,b):
    d=a.astype(np.float64)-b.astype(np.float64); return 20*np.log10(255/np.sqrt(np.mean(d**2)))

ref, dist = make_pair()
T = lambda a: torch.from_numpy(a).permute(2,0,1).double()/255
out = {}
out["psnr_rgb_skimage"] = peak_signal_noise_ratio(ref, dist, data_range=255)
out["psnr_y_release"] = mpsnr(y(dist), y(ref))
out["psnr_rgbmean_release"] = np.mean([mpsnr(dist[...,c], ref[...,c]) for c in range(3)])
out["ssim_y_release"] = mssim(y(dist), y(ref))
out["ssim_y_skimage"] = structural_similarity(y(ref), y(dist), data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
out["ssim_rgb_release"] = np.mean([mssim(dist[...,c], ref[...,c]) for c in range(3)])
out["ssim_rgb_skimage"] = structural_similarity(ref, dist, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2)
ours = {"psnr_rgb": psnr(T(dist),T(ref),channel="rgb"), "psnr_y": psnr(T(dist),T(ref),channel="y"),
        "psnr_rgbmean": psnr(T(dist),T(ref),channel="rgb_mean"), "ssim_y": ssim(T(dist),T(ref),channel="y"), "ssim_rgb": ssim(T(dist),T(ref),channel="rgb")}
for k,v in out.items(): print(f"{k:24s} {v!r}")
for k,v in ours.items(): print(f"ours {k:19s} {float(v)!r}")
