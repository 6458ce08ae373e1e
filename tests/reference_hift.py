"""A straightforward HiFT loop written with stock torch, the independent reference for the runtime.

One torch.optim optimizer per group over that group's parameters, `requires_grad` toggled by
hand, the same order and lr policy as HiFT describes; nothing from hift_rt is used.
"""
import torch


def params_of(model, prefixes):
    """Trainable parameters whose name is a prefix or starts with prefix + '.', in model order."""
    return [(n, p) for n, p in model.named_parameters()
            if any(n == pre or n.startswith(pre + ".") for pre in prefixes)]


class ReferenceHiFT:
    def __init__(self, model, group_prefixes, optim_cls, *, lr, strategy="bottom_up", seed=0,
                 lr_policy="step", no_decay=(), max_grad_norm=None, **hyper):
        self.model = model
        self.groups = [params_of(model, prefixes) for prefixes in group_prefixes]
        self.opts = []
        for group in self.groups:
            decay = [p for n, p in group if not any(s in n for s in no_decay)]
            rest = [p for n, p in group if any(s in n for s in no_decay)]
            specs = [{"params": decay}] + ([{"params": rest, "weight_decay": 0.0}] if rest else [])
            specs = [s for s in specs if s["params"]]
            self.opts.append(optim_cls(specs, lr=lr, foreach=False, **hyper))
        # Schedulers drive this optimizer's lr; each step reads it from here.
        self.lr_driver = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self.strategy, self.lr_policy, self.max_grad_norm = strategy, lr_policy, max_grad_norm
        self.generator = torch.Generator().manual_seed(seed)
        self.k = len(self.groups)
        self.cycle, self.position = 0, 0
        self.order = self._draw()
        self.cycle_lr = None
        for p in model.parameters():
            p.requires_grad_(False)
        self._set_trainable(self.active, True)

    def _draw(self):
        if self.strategy == "bottom_up":
            return list(range(self.k))
        if self.strategy == "top_down":
            return list(range(self.k - 1, -1, -1))
        return torch.randperm(self.k, generator=self.generator).tolist()

    @property
    def active(self):
        return self.order[self.position]

    def _set_trainable(self, g, on):
        for _, p in self.groups[g]:
            p.requires_grad_(on)
            if not on:
                p.grad = None

    def step(self):
        g = self.active
        lr = self.lr_driver.param_groups[0]["lr"]
        if self.lr_policy == "cycle":  # the largest lr scheduled so far in this cycle
            self.cycle_lr = lr if self.position == 0 or self.cycle_lr is None else max(self.cycle_lr, lr)
            lr = self.cycle_lr
        for pg in self.opts[g].param_groups:
            pg["lr"] = lr
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.groups[g]], self.max_grad_norm)
        self.opts[g].step()
        self.lr_driver.step()  # a no-op (its parameter has no gradient); schedulers expect it
        self._set_trainable(g, False)
        self.position += 1
        if self.position == self.k:
            self.cycle += 1
            self.position = 0
            self.order = self._draw()
        self._set_trainable(self.active, True)

    def zero_grad(self):
        for _, p in self.groups[self.active]:
            p.grad = None

    def state_of(self, name):
        for group, opt in zip(self.groups, self.opts):
            for n, p in group:
                if n == name:
                    return opt.state.get(p, {})
        raise KeyError(name)
