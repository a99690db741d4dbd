"""FLOPs and speed: the training FLOPs per token of a GPT, tokens/s and model FLOPs utilisation (MFU)
against a GPU's peak, and the peak memory a run held. train_sft.py logs them; nanorlhf/benchmark.py too."""
import resource

import torch

from nanorlhf.model import GPT, GPTConfig

# Peak dense (no 2:4 sparsity) tensor-core FLOP/s of one GPU, from the vendor's data sheets:
# (bf16/fp16, fp32 matmuls run as TF32, which setup_runtime turns on). Unknown GPUs and CPUs get no
# MFU, only the achieved FLOP/s. Keys are matched against torch.cuda.get_device_name(), first match wins.
PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 495e12),  # SXM
    "H200": (989e12, 495e12),  # the H100's compute with more and faster memory
    "A100": (312e12, 156e12),
}


# Training FLOPs per token of a GPT (Kaplan et al. 2020 Sec. 2.1; PaLM, Chowdhery et al. 2022, App. B;
# nanoGPT's estimate_mfu):  6 N + 12 L C T
#   6 N       each weight does one multiply-add (2 FLOPs) per token forwards and two backwards;
#             N = the parameters less the position embeddings (a lookup): the token embedding
#             counts through the matmul of the LM head tied to it
#   12 L C T  attention scores q k^T and their sum over v: 2 matmuls of 2 T C FLOPs per token per
#             layer forwards, x3 with the backward; causal masking's half is not subtracted
def model_flops_per_token(config, seq_len):
    """Training FLOPs per token of a GPTConfig (or a GPT) at sequence length seq_len."""
    if isinstance(config, GPTConfig):
        with torch.device("meta"):  # counts the parameters without allocating them
            config = GPT(config)
    c = config.config
    return 6 * config.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len


def training_speed(model, batch_shapes, seconds, peak=None):
    """-> (tokens/s, MFU) of training steps that took `seconds` for batches of these (B, T) shapes:
    every position counts, padding included (the model computes it); MFU is the model FLOP/s over
    `peak` (peak_flops), None without one."""
    tokens = sum(B * T for B, T in batch_shapes)
    flops = sum(B * T * model_flops_per_token(model, T) for B, T in batch_shapes)
    return tokens / seconds, (flops / seconds / peak if peak else None)


def peak_flops(device, dtype):
    """Peak FLOP/s of the device at dtype, or None when not in PEAK_FLOPS (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device):
    """GPU: the most memory tensors held since the last reset. CPU: the process's peak resident
    set so far (ru_maxrss, kB on Linux), which no reset lowers."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
