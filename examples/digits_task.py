# digits_task.py
import torch
from sklearn.datasets import load_digits
import flatness.experiments as fx

class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))

def make_task():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    return fx.custom_task(
        name="digits-cnn",
        model=SmallCNN,                          # called under each run's seed
        train=(x[:1400], y[:1400]),              # a fixed validation split is carved from it
        test=(x[1400:], y[1400:]),
        loss=torch.nn.functional.cross_entropy,  # any callable(output, target) -> scalar
        config=fx.TrainConfig(epochs=3, batch_size=64, lr=1e-3, weight_decay=0.0),
    )
