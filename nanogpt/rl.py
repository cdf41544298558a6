"""Reinforcement learning from verifiable rewards, the GRPO family: one implementation with the switches of the
literature, chosen by train.py's rl_* settings.

One step (train.py calls RLRun.step once per iteration):
  1. Prompts. Each rank takes its own rl_prompts problems of a seeded shuffle of the task's train.jsonl (GSM8K's
     record format: {"question", "answer" ending in '#### N'}), rendered as chat prompts (nanogpt/chat_format.py).
  2. Rollouts. rl_group_size completions per prompt, sampled in one batch through the KV cache (prompts of equal
     length share the batch) at rl_temperature / rl_top_k, each ending at <|assistant_end|> or rl_max_new_tokens.
  3. Rewards from the verifier: 1 when the reply's final '#### N' number equals the reference's, else 0
     (reward 'answer_format': a wrong but well-formed '#### N' line earns FORMAT_REWARD).
  4. Advantages (Shao et al. 2024, GRPO): A = r - mean of its group; scale_rewards 'group' divides by the group's
     std (+1e-4), 'batch' by the std over the whole global batch, 'none' not at all (Dr. GRPO, Liu et al. 2025;
     nanochat's chat_rl). A group whose rewards are all equal has A = 0: it contributes no policy gradient (its
     share is logged). rl_negative_weight scales the negative advantages: 1 is GRPO; below 1 the step leans on
     reinforcing successes, which Zhu et al. 2025 ("The Surprising Effectiveness of Negative Reinforcement in LLM
     Reasoning") find sharpens the policy (pass@1), while pushing failures down spreads it (pass@k).
  5. Loss per completion token t, ratio rho = pi(t) / pi_old(t), where pi is the policy the tokens were sampled
     from: the logits divided by rl_temperature and, with rl_top_k, renormalised over the k likeliest tokens. With
     the full-vocabulary softmax instead, pushing a bad token down would also lift the never-sampled tail of the
     vocabulary (the reason for it; on the arith task it did not change the outcome: bench/RESULTS.md). pi_old: the
     same before the first update,
         l_t = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta k3_t,
         k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1               (Schulman's k3 estimator of KL(pi||ref))
     aggregated as rl_loss_type:
         'token'    sum over every completion token of the global batch / their number (DAPO, Yu et al. 2025;
                    TRL's 'dapo'; nanochat)
         'sequence' mean over each completion's tokens, then over completions (GRPO as published; TRL's 'grpo')
         'dr_grpo'  sum over tokens / (completions x rl_max_new_tokens)    (Dr. GRPO: no length bias)
     The normalisers count the whole global batch (every rank's completions), so the gradient DDP averages is the
     one a single process with the whole batch would compute. With rl_updates = 1 the step is strictly on-policy
     (rho = 1: clipping never binds); with rl_updates > 1 (PPO-style) the batch is reused for that many optimizer
     steps against the log-probs kept from before the first one.
The sampler's generator travels with the prompt stream's state in the checkpoint: a resumed run draws the same
prompts and the same completions as an uninterrupted one. Evaluation: pass@1 and pass@k (the unbiased estimator of
Chen et al. 2021 from rl_eval_samples completions per problem) on the held-out split.
"""
import functools
import json
import math
import os
import re
import time

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from model import LOSS_CHUNK_ELEMENTS, KVCache
from nanogpt.chat_format import chat_tokens, render_prompt
from nanogpt.parallel import gradient_sync, sum_over_ranks
from nanogpt.sampling import SamplingParams, filtered_logits, next_tokens

TASKS = ("arith", "gsm8k")        # the folder in data_root holding {train,val,test}.jsonl of the task's problems
REWARDS = ("answer", "answer_format")
SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("token", "sequence", "dr_grpo")
FORMAT_REWARD = 0.1               # answer_format: a wrong answer in a well-formed '#### N' line
FINAL = re.compile(r"#### *(-?[$0-9.,]+)")

# ------------------------------------------------------------------------------------------------- the verifier


def final_number(text):
    """The number after the last '#### ' of a text, without commas, '$' or a final '.'; None when there is none."""
    found = FINAL.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "").replace("$", "").rstrip(".")
    return number or None


def reward(reply, reference, kind="answer"):
    """1.0 when the reply's final number equals the reference answer's, else 0.0 (FORMAT_REWARD for a wrong number
    in a well-formed line, with kind 'answer_format')."""
    got, want = final_number(reply), final_number(reference)
    if got is not None and want is not None and got == want:
        return 1.0
    return FORMAT_REWARD if kind == "answer_format" and got is not None else 0.0


def read_problems(path):
    """[{"question", "answer", ...}] of a JSONL file; a ValueError naming file:line for a record that is not one."""
    problems = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                           for k in ("question", "answer")):
                    raise ValueError
                if final_number(record["answer"]) is None:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{path}:{number}: expected {{\"question\": ..., \"answer\": \"... #### N\"}}") \
                    from None
            problems.append(record)
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def task_problems(data_root, task, split):
    """The problems of a task's split: data_root/task/split.jsonl (data/arith/prepare.py; data/gsm8k/prepare.py
    downloads train.jsonl and test.jsonl there)."""
    path = os.path.join(data_root, task, f"{split}.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"no {path}: prepare the task first (python data/{task}/prepare.py)")
    return read_problems(path)


def pass_at_k(n, c, k):
    """The unbiased pass@k of one problem with c of n samples correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))

# ------------------------------------------------------------------------------------------------- rollouts


@torch.no_grad()
def sample_batch(model, prompts, max_new_tokens, stop_id, temperature=1.0, top_k=None, generator=None):
    """One completion of each prompt (lists of ids, all of one length: no padding needed), sampled in one batch
    through the KV cache: (token lists, each ending at stop_id when it was sampled; (summed entropy of the policy's
    distribution over the sampled positions, their number)). Finished rows keep decoding (the batch advances
    together) but add nothing."""
    if len(prompts[0]) + max_new_tokens > model.config.block_size:
        raise ValueError(f"a prompt of {len(prompts[0])} tokens plus {max_new_tokens} new tokens exceeds "
                         f"block_size {model.config.block_size}: raise block_size or lower rl_max_new_tokens")
    device = model.wte.weight.device
    cache = KVCache(model.config)
    h = model(torch.tensor(prompts, device=device), cache=cache)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, entropy, counted = [], torch.zeros((), device=device), 0
    for _ in range(max_new_tokens):
        logits = model.logits(h[:, -1]).float()
        logp = logits.log_softmax(-1)
        entropy += -(logp.exp() * logp).sum(-1)[~done].sum()
        counted += int((~done).sum())
        params = SamplingParams(temperature=temperature, top_k=top_k or 0)
        token = next_tokens(logits, params, generators=generator)[:, None]
        token[done] = stop_id
        tokens.append(token)
        done |= token[:, 0] == stop_id
        if done.all():
            break
        h = model(token, cache=cache)
    rows = torch.cat(tokens, 1).tolist()
    return [row[:row.index(stop_id) + 1] if stop_id in row else row for row in rows], (entropy.item(), counted)


def prompt_ids(tokenizer, question):
    return render_prompt(tokenizer, [{"role": "user", "content": question}])

# ------------------------------------------------------------------------------------------------- the loss


def group_advantages(rewards, scale="group", batch_std=None, negative_weight=1.0):
    """(advantages (P, G), all-equal groups (P,) bool) from rewards (P, G): reward - group mean, divided by the
    group's std + 1e-4 ('group'), by batch_std + 1e-4 ('batch': the std of every reward of the global batch) or
    not at all ('none'), the negative ones then times negative_weight. Stds are unbiased (n - 1), as torch.std and
    TRL compute them."""
    advantages = rewards - rewards.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (rewards.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        advantages = advantages / ((rewards.std() if batch_std is None else batch_std) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    advantages = torch.where(advantages < 0, advantages * negative_weight, advantages)
    return advantages, rewards.amax(1) == rewards.amin(1)


def token_losses(logp, old_logp, advantages, clip_eps, clip_eps_high, ref_logp=None, beta=0.0):
    """(per-token loss, clipped (bool), k3 KL or None) for completion tokens: the clipped surrogate
    -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A), rho = exp(logp - old_logp), plus beta k3 to the reference.
    advantages: each token's completion's advantage."""
    ratio = (logp - old_logp).exp()
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps_high)
    unclipped, clipped = ratio * advantages, clipped_ratio * advantages
    loss = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None:
        # after a first update a sampled token may leave the policy's top k (logp -inf): the policy no longer
        # samples it, so it adds nothing to KL(pi || ref), an expectation under pi
        delta = torch.where(torch.isinf(logp), 0.0, ref_logp - logp)
        kl = delta.exp() - delta - 1
        loss = loss + beta * kl
    return loss, clipped < unclipped, kl


def aggregate(losses, sequence, lengths, loss_type, total_tokens, total_sequences, max_new_tokens):
    """The loss of a set of completion tokens as its share of the global batch's: losses (M,) per token, sequence
    (M,) each token's completion index into lengths (its token count); totals over the whole global batch."""
    if loss_type == "token":
        return losses.sum() / total_tokens
    if loss_type == "sequence":
        return (losses / lengths[sequence]).sum() / total_sequences
    if loss_type == "dr_grpo":
        return losses.sum() / (total_sequences * max_new_tokens)
    raise ValueError(f"rl_loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def padded_rows(prompts, completions, pad_id):
    """(x, y) (N, L) for next-token forwards over prompt + completion, y = -1 except on the completion tokens."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    length = max(map(len, seqs)) - 1
    x = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), length), -1, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
    return x, y


def sampled_logprobs(logits, targets, temperature=1.0, top_k=0):
    """log pi(target) of each row under the sampling policy: the sampler's own filtered_logits (logits / temperature,
    then the top_k likeliest, ties at the k-th value kept), renormalised."""
    params = [SamplingParams(temperature=temperature, top_k=top_k)] * len(logits)
    return filtered_logits(logits, params).log_softmax(-1).gather(1, targets[:, None])[:, 0]


def completion_logprobs(model, head, x, y, softcap=0.0, temperature=1.0, top_k=0):
    """log pi of each completion token (the positions where y >= 0, row-major) under the sampling policy,
    differentiable: one forward for the hidden states, then the head in chunks of rows whose (rows, vocab) logits
    are recomputed in backward, so long completions never hold every position's logits at once."""
    h = model(x)
    counted = y >= 0
    h, targets = h[counted], y[counted]

    def chunk(hc, tc):
        return sampled_logprobs(head(hc, softcap=softcap), tc, temperature, top_k)
    rows = max(1, LOSS_CHUNK_ELEMENTS // head.out_features)
    run = functools.partial(checkpoint, chunk, use_reentrant=False) if torch.is_grad_enabled() else chunk
    return torch.cat([run(h[i:i + rows], targets[i:i + rows]) for i in range(0, len(h), rows)])

# ------------------------------------------------------------------------------------------------- the run


class PromptStream:
    """The train problems in a seeded order, each rank its own `per_rank` a step, epoch after epoch; it owns the
    sampler's generator, so its state_dict (saved as the run's loader state) makes resuming exact."""

    def __init__(self, problems, per_rank, rank, world_size, seed, device):
        self.problems, self.per_rank, self.rank, self.world = problems, per_rank, rank, world_size
        self.seed, self.epoch, self.position = seed, 0, 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed + 1000 * rank)
        self.pairs = False

    def order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.problems))

    def next_problems(self):
        """This rank's problems of the next global batch of per_rank x world_size."""
        step = self.per_rank * self.world
        if self.position + step > len(self.problems):
            self.epoch, self.position = self.epoch + 1, 0
        chosen = self.order()[self.position + self.rank * self.per_rank:][:self.per_rank]
        self.position += step
        return [self.problems[i] for i in chosen]

    def mixture(self):
        return None

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]
        self.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu")
                                 else state["generator"])


class RLRun:
    """The RL objective of one training run: settings s (a dict of train.py's rl_* settings, micro_batch,
    world_size), the tokenizer, the raw (unwrapped) policy for sampling and its head, the frozen reference or
    None."""

    def __init__(self, s, tokenizer, raw_model, reference=None):
        self.s, self.tokenizer, self.raw, self.reference = s, tokenizer, raw_model, reference
        self.stop_id = chat_tokens(tokenizer)["assistant"][1]
        self.vocab = tokenizer.vocab_size

    def rollouts(self, problems, generator):
        """(prompts, completions, rewards (P, G), entropy (sum, count)): G completions of each problem, prompts of
        equal length sampled together in one batch."""
        s, G = self.s, self.s["rl_group_size"]
        prompts = [prompt_ids(self.tokenizer, p["question"]) for p in problems]
        completions = [None] * len(problems)
        entropy = [0.0, 0]
        for length in sorted(set(map(len, prompts))):
            same = [i for i, p in enumerate(prompts) if len(p) == length]
            self.raw.eval()
            rows, (e, n) = sample_batch(self.raw, [prompts[i] for i in same for _ in range(G)],
                                        s["rl_max_new_tokens"], self.stop_id, s["rl_temperature"],
                                        s["rl_top_k"] or None, generator)
            self.raw.train()
            entropy[0] += e
            entropy[1] += n
            for j, i in enumerate(same):
                completions[i] = rows[j * G:(j + 1) * G]
        rewards = torch.tensor([[reward(self.tokenizer.decode([t for t in c if t < self.vocab]), p["answer"],
                                        s["rl_reward"]) for c in group] for p, group in zip(problems, completions)])
        return prompts, completions, rewards, tuple(entropy)

    def step(self, model, problems, generator, optimizer_step, autocast):
        """One RL iteration on this rank's problems: rollouts, rewards, advantages, then rl_updates optimizer steps
        (optimizer_step() clips, steps and zeroes the gradients). Returns the step's metrics as tensors (means
        over this rank; train.py averages them over ranks)."""
        t0 = time.time()
        prompts, completions, rewards, entropy = self.rollouts(problems, generator)
        return self.update(model, prompts, completions, rewards, optimizer_step, autocast,
                           {"entropy": entropy, "sample_seconds": time.time() - t0})

    def update(self, model, prompts, completions, rewards, optimizer_step, autocast, sampling=None):
        """The optimizer steps of one batch of rollouts: prompts (P lists of ids), completions (P groups of G id
        lists), rewards (P, G); `model` is the policy as trained (DDP-wrapped or not). Returns the metrics."""
        s, G, world = self.s, self.s["rl_group_size"], self.s["world_size"]
        sampling = sampling or {"entropy": (0.0, 0), "sample_seconds": 0.0}
        (entropy, entropy_n), t_sample = sampling["entropy"], sampling["sample_seconds"]
        flat_prompts = [p for p in prompts for _ in range(G)]
        flat_completions = [c for group in completions for c in group]
        lengths = torch.tensor([len(c) for c in flat_completions], dtype=torch.float)
        totals = sum_over_ranks(torch.tensor([lengths.sum().item(), float(len(lengths)), rewards.sum().item(),
                                              (rewards ** 2).sum().item(), float(rewards.numel())],
                                             dtype=torch.float64))
        batch_std = None
        if s["rl_scale_rewards"] == "batch":
            n = totals[4]
            batch_std = ((totals[3] - totals[2] ** 2 / n) / max(n - 1, 1)).clamp(min=0).sqrt().float()
        advantages, equal = group_advantages(rewards, s["rl_scale_rewards"], batch_std, s["rl_negative_weight"])
        advantages = advantages.flatten()
        total_tokens, total_sequences = totals[0].item(), totals[1].item()

        # micro-batches of sequences, their old and reference log-probs fixed before the first update
        device = self.raw.wte.weight.device
        micro = [list(range(i, min(i + s["micro_batch"], len(flat_prompts))))
                 for i in range(0, len(flat_prompts), s["micro_batch"])]
        batches = []
        for rows in micro:
            x, y = padded_rows([flat_prompts[i] for i in rows], [flat_completions[i] for i in rows],
                               self.tokenizer.eot)
            sequence = torch.tensor(rows).repeat_interleave(lengths[rows].long())
            batches.append({"x": x.to(device), "y": y.to(device), "sequence": sequence.to(device)})
        policy = (self.raw.config.logit_softcap, s["rl_temperature"], s["rl_top_k"] or 0)  # what sampled them
        with torch.no_grad(), autocast:
            for b in batches:
                if s["rl_updates"] > 1:
                    b["old"] = completion_logprobs(model, self.raw.lm_head, b["x"], b["y"], *policy).float()
                if self.reference is not None:
                    # the reference over its whole vocabulary: its top k may not hold the sampled token
                    b["ref"] = completion_logprobs(self.reference, self.reference.lm_head, b["x"], b["y"],
                                                   *policy[:2]).float()
        t1 = time.time()
        lengths_d, adv_d = lengths.to(device), advantages.to(device)
        loss_sum = clip_sum = kl_sum = torch.zeros((), device=device)
        for update in range(s["rl_updates"]):
            for i, b in enumerate(batches):
                with gradient_sync(model, i == len(batches) - 1), autocast:
                    logp = completion_logprobs(model, self.raw.lm_head, b["x"], b["y"], *policy).float()
                    old = b.get("old", logp.detach())
                    losses, clipped, kl = token_losses(logp, old, adv_d[b["sequence"]], s["rl_clip_eps"],
                                                       s["rl_clip_eps_high"] or s["rl_clip_eps"], b.get("ref"),
                                                       s["rl_kl_beta"])
                    loss = aggregate(losses, b["sequence"], lengths_d, s["rl_loss_type"], total_tokens,
                                     total_sequences, s["rl_max_new_tokens"])
                (loss * world).backward()  # DDP averages over ranks: the sum over ranks / the global normaliser
                if update == s["rl_updates"] - 1:
                    loss_sum = loss_sum + loss.detach() * world
                    clip_sum = clip_sum + clipped.float().sum()
                    kl_sum = kl_sum + (kl.detach().sum() if kl is not None else 0.0)
            optimizer_step()
        t_train = time.time() - t1
        n_tokens = lengths.sum().item()
        metrics = {"loss": loss_sum, "reward": rewards.mean(), "pass@1": (rewards == 1).float().mean(),
                   "all_equal": equal.float().mean(), "response_tokens": lengths.mean(),
                   "entropy": torch.tensor(entropy / max(entropy_n, 1)),
                   "clipped": clip_sum / max(n_tokens, 1),
                   "sample_tok_s": torch.tensor(n_tokens / max(t_sample, 1e-9)),
                   "train_tok_s": torch.tensor(s["rl_updates"] * sum(b["x"].numel() for b in batches)
                                               / max(t_train, 1e-9))}
        if self.reference is not None:
            metrics["kl"] = kl_sum / max(n_tokens, 1)
        return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def solve_rates(model, prompts, references, samples, stop_id, vocab, tokenizer, temperature, top_k, max_new_tokens,
                generator, max_rows=256, kind="answer"):
    """Correct completions of each prompt out of `samples` (temperature 0: one greedy completion), prompts of equal
    length batched together, at most max_rows sequences a batch."""
    correct = [0] * len(prompts)
    per_prompt = 1 if temperature == 0 else samples
    for length in sorted(set(map(len, prompts))):
        same = [i for i, p in enumerate(prompts) if len(p) == length]
        step = max(1, max_rows // per_prompt)
        for start in range(0, len(same), step):
            chunk = same[start:start + step]
            rows, _ = sample_batch(model, [prompts[i] for i in chunk for _ in range(per_prompt)], max_new_tokens,
                                   stop_id, temperature, top_k, generator)
            for j, i in enumerate(chunk):
                for c in rows[j * per_prompt:(j + 1) * per_prompt]:
                    text = tokenizer.decode([t for t in c if t < vocab])
                    correct[i] += reward(text, references[i], kind) == 1.0
    return correct


def pass_metrics(correct, samples, ks):
    """{'pass@k': mean over problems} of the unbiased estimator, for each k in ks (k <= samples)."""
    return {f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / max(len(correct), 1) for k in ks}


def evaluate_pass(model, tokenizer, problems, s, rank=0, world_size=1):
    """pass@1 and pass@k (k = rl_eval_samples) of the chat policy on held-out problems at the sampling settings,
    each rank its share of the problems, from a generator seeded the same at every evaluation (training's sampler
    is not touched: resuming stays exact)."""
    model.eval()
    generator = torch.Generator(device=model.wte.weight.device)
    generator.manual_seed(s["seed"] + 17 * rank)
    mine = problems[rank::world_size]
    stop_id = chat_tokens(tokenizer)["assistant"][1]
    correct = solve_rates(model, [prompt_ids(tokenizer, p["question"]) for p in mine], [p["answer"] for p in mine],
                          s["rl_eval_samples"], stop_id, tokenizer.vocab_size, tokenizer, s["rl_temperature"],
                          s["rl_top_k"] or None, s["rl_max_new_tokens"], generator)
    model.train()
    ks = sorted({1, s["rl_eval_samples"]})
    sums = sum_over_ranks(torch.tensor([len(mine) * v for v in pass_metrics(correct, s["rl_eval_samples"],
                                                                             ks).values()] + [len(mine)],
                                       dtype=torch.float64))
    return {f"pass@{k}": (sums[i] / sums[-1]).item() for i, k in enumerate(ks)}
