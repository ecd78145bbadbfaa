"""Transcriptions of fcdl94/WILSON (41c7d5b) used as the reference in tests/test_wilson_parts.py only: utils/wss_loss.py
(ngwp_focal, attention_cam, bce_loss, binarize), wss/single_stage.py (pseudo_gtmask, balanced_mask_loss_ce),
wss/modules.py (the PAMR modules, without the run-time kernel assertion), utils/utils.py (denorm) and the target /
l_SEG block of train.py (lines 243-282) as a function. Not imported by the framework.

MIT License

Copyright (c) 2020 Fabio Cermelli

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def ngwp_focal(outputs, focal=True, alpha=1e-5, lam=1e-2):
    bs, c, h, w = outputs.size()
    masks = F.softmax(outputs, dim=1)
    masks_ = masks.view(bs, c, -1)
    logits = outputs.view(bs, c, -1)
    y_ngwp = (logits * masks_).sum(-1) / (1.0 + masks_.sum(-1))
    if focal:
        y_focal = torch.pow(1 - masks_.mean(-1), 3) * torch.log(lam + masks_.mean(-1))
        y = y_ngwp + y_focal
    else:
        y = y_ngwp
    return y


def attention_cam(outputs, alpha=0.01):
    bs, c, h, w = outputs.size()
    masks = F.softmax(outputs, dim=1)
    masks_ = masks.view(bs, c, -1)
    logits = outputs.view(bs, c, -1)
    y_ngwp = (logits * (masks_ + alpha)).sum(-1) / (masks_ + alpha).sum(-1)
    return y_ngwp


def bce_loss(outputs, labels, mode='ngwp', reduction='sum'):
    bs, c, h, w = outputs.size()
    if mode == 'ngwp':
        y = ngwp_focal(outputs)
    elif mode == 'att':
        y = attention_cam(outputs)
    else:
        logits = outputs.view(bs, c, -1)
        y = logits.mean(-1)
    bs, n_cls = labels.shape
    y = y[:, -n_cls:]
    if reduction == 'sum':
        l = F.binary_cross_entropy_with_logits(y, labels, reduction="none").sum(dim=1).mean()  # noqa: E741
    else:
        l = F.binary_cross_entropy_with_logits(y, labels)  # noqa: E741
    return l


def binarize(input):
    max = input.max(dim=1, keepdim=True)[0]
    return (input >= max).type_as(input)


def pseudo_gtmask(mask, ambiguous=True, cutoff_top=0.6, cutoff_bkg=0.6, cutoff_low=0.2, eps=1e-8, old_classes=16):
    bs, c, h, w = mask.size()
    mask = mask.view(bs, c, -1)
    mask_max, _ = mask.max(-1, keepdim=True)
    mask_max[:, :1] *= cutoff_bkg
    mask_max[:, 1:] *= cutoff_top
    lowest = torch.Tensor([cutoff_low]).type_as(mask_max)
    mask_max = mask_max.max(lowest)
    pseudo_gt = (mask > mask_max).type_as(mask)
    if ambiguous:
        ambiguous = (pseudo_gt.sum(1, keepdim=True) > 1).type_as(mask)
        pseudo_gt = (1 - ambiguous) * pseudo_gt
    return pseudo_gt.view(bs, c, h, w)


def balanced_mask_loss_ce(mask, pseudo_gt, gt_labels, ignore_index=255, old_classes=16):
    mask = F.interpolate(mask, size=pseudo_gt.size()[-2:], mode="bilinear", align_corners=True)
    mask_gt = torch.argmax(pseudo_gt, 1)
    ignore_mask = pseudo_gt.sum(1) < 1.
    mask_gt[ignore_mask] = ignore_index
    bs, c, h, w = pseudo_gt.size()
    num_pixels_per_class = pseudo_gt.view(bs, c, -1).sum(-1)
    num_pixels_total = num_pixels_per_class.sum(-1, keepdim=True)
    class_weight = (num_pixels_total - num_pixels_per_class) / (1 + num_pixels_total)
    class_weight = (pseudo_gt * class_weight[:, :, None, None]).sum(1).view(bs, -1)
    loss = F.cross_entropy(mask, mask_gt, ignore_index=ignore_index, reduction="none")
    loss = loss.view(bs, -1)
    gt_num_labels = gt_labels.sum(-1).type_as(loss) + 1
    ps_num_labels = (num_pixels_per_class > 0).type_as(loss).sum(-1)
    batch_weight = (gt_num_labels == ps_num_labels).type_as(loss)
    loss = batch_weight * (class_weight * loss).mean(-1)
    return loss.mean()


class LocalAffinity(nn.Module):
    def __init__(self, dilations=[1]):
        super(LocalAffinity, self).__init__()
        self.dilations = dilations
        weight = self._init_aff()
        self.register_buffer('kernel', weight)

    def _init_aff(self):
        weight = torch.zeros(8, 1, 3, 3)
        for i in range(weight.size(0)):
            weight[i, 0, 1, 1] = 1
        weight[0, 0, 0, 0] = -1
        weight[1, 0, 0, 1] = -1
        weight[2, 0, 0, 2] = -1
        weight[3, 0, 1, 0] = -1
        weight[4, 0, 1, 2] = -1
        weight[5, 0, 2, 0] = -1
        weight[6, 0, 2, 1] = -1
        weight[7, 0, 2, 2] = -1
        return weight

    def forward(self, x):
        B, K, H, W = x.size()
        x = x.view(B * K, 1, H, W)
        x_affs = []
        for d in self.dilations:
            x_pad = F.pad(x, [d] * 4, mode='replicate')
            x_aff = F.conv2d(x_pad, self.kernel.type_as(x), dilation=d)
            x_affs.append(x_aff)
        x_aff = torch.cat(x_affs, 1)
        return x_aff.view(B, K, -1, H, W)


class LocalAffinityCopy(LocalAffinity):
    def _init_aff(self):
        weight = torch.zeros(8, 1, 3, 3)
        weight[0, 0, 0, 0] = 1
        weight[1, 0, 0, 1] = 1
        weight[2, 0, 0, 2] = 1
        weight[3, 0, 1, 0] = 1
        weight[4, 0, 1, 2] = 1
        weight[5, 0, 2, 0] = 1
        weight[6, 0, 2, 1] = 1
        weight[7, 0, 2, 2] = 1
        return weight


class LocalStDev(LocalAffinity):
    def _init_aff(self):
        weight = torch.zeros(9, 1, 3, 3)
        weight.zero_()
        weight[0, 0, 0, 0] = 1
        weight[1, 0, 0, 1] = 1
        weight[2, 0, 0, 2] = 1
        weight[3, 0, 1, 0] = 1
        weight[4, 0, 1, 1] = 1
        weight[5, 0, 1, 2] = 1
        weight[6, 0, 2, 0] = 1
        weight[7, 0, 2, 1] = 1
        weight[8, 0, 2, 2] = 1
        return weight

    def forward(self, x):
        x = super(LocalStDev, self).forward(x)
        return x.std(2, keepdim=True)


class LocalAffinityAbs(LocalAffinity):
    def forward(self, x):
        x = super(LocalAffinityAbs, self).forward(x)
        return torch.abs(x)


class PAMR(nn.Module):
    def __init__(self, num_iter=10, dilations=[1, 2, 4, 8, 12, 24]):
        super(PAMR, self).__init__()
        self.num_iter = num_iter
        self.aff_x = LocalAffinityAbs(dilations)
        self.aff_m = LocalAffinityCopy(dilations)
        self.aff_std = LocalStDev(dilations)

    def forward(self, x, mask):
        mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
        B, K, H, W = x.size()
        _, C, _, _ = mask.size()
        x_std = self.aff_std(x)
        x = -self.aff_x(x) / (1e-8 + 0.1 * x_std)
        x = x.mean(1, keepdim=True)
        x = F.softmax(x, 2)
        for _ in range(self.num_iter):
            m = self.aff_m(mask)
            mask = (m * x).sum(2)
        return mask


def denorm(image, mean=(0.485, 0.456, 0.4069), std=(0.229, 0.224, 0.225)):
    image = image.clone()
    for t, m, s in zip((0, 1, 2), mean, std):
        image[:, t, :, :].mul_(s).add_(m)
    return image


def weak_step_losses(int_masks, int_masks_raw, outputs, outputs_old, images, l1h, old_classes, tot_classes, alpha,
                     affinity, icarl_bkg=-1, l_seg_weight=1.0):
    """train.py 243-282 from ``cur_epoch >= self.pseudo_epoch`` on: (l_seg, l_cls)."""
    bs = images.shape[0]
    int_masks_orig = int_masks.softmax(dim=1)
    int_masks_soft = int_masks.softmax(dim=1)
    image_raw = denorm(images)
    im = F.interpolate(image_raw, int_masks.shape[-2:], mode="bilinear", align_corners=True)
    int_masks_soft = affinity(im, int_masks_soft.detach())
    int_masks_orig[:, 1:] *= l1h[:, :, None, None]
    int_masks_soft[:, 1:] *= l1h[:, :, None, None]
    pseudo_gt_seg = pseudo_gtmask(int_masks_soft, ambiguous=True, cutoff_top=0.6, cutoff_bkg=0.7,
                                  cutoff_low=0.2).detach()
    pseudo_gt_seg_lx = binarize(int_masks_orig)
    pseudo_gt_seg_lx = (alpha * pseudo_gt_seg_lx) + ((1 - alpha) * int_masks_orig)
    px_cls_per_image = pseudo_gt_seg_lx.view(bs, tot_classes, -1).sum(dim=-1)
    batch_weight = torch.eq((px_cls_per_image[:, old_classes:] > 0), l1h[:, old_classes - 1:].bool())
    batch_weight = (batch_weight.sum(dim=1) == (tot_classes - old_classes)).float()
    target_old = torch.sigmoid(outputs_old.detach())
    target = torch.cat((target_old, pseudo_gt_seg_lx[:, old_classes:]), dim=1)
    if icarl_bkg == -1:
        target[:, 0] = torch.min(target[:, 0], pseudo_gt_seg_lx[:, 0])
    else:
        target[:, 0] = (1 - icarl_bkg) * target[:, 0] + icarl_bkg * pseudo_gt_seg_lx[:, 0]
    l_seg = F.binary_cross_entropy_with_logits(outputs, target, reduction='none').sum(dim=1)
    l_seg = l_seg.view(bs, -1).mean(dim=-1)
    l_seg = l_seg_weight * (batch_weight * l_seg).sum() / (batch_weight.sum() + 1e-5)
    l_cls = balanced_mask_loss_ce(int_masks_raw, pseudo_gt_seg, l1h)
    return l_seg, l_cls
