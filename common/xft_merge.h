// xft_merge.h: XFT's learnable merge of a trained MoE back into a dense model
// (docs/METHODS.md 2.13; *XFT: Unlocking the Power of Code Instruction Tuning by Simply
// Merging Upcycled Mixture-of-Experts*, arXiv 2404.15247). Per layer, the dense FFN is
//   W = lambda S + (1 - lambda) sum_i softmax(alpha)_i X_i      (gate, up and down alike;
// the formula and its gradient: common/upcycle_ops.h xft_merge_matrix, xft_merge_alpha_grad)
// with S the shared expert, X_i routed expert i and alpha (E numbers per layer) the only
// trained parameters: the merged dense model is run by the CPU trainer, its backward gives
// dLoss/dW, and the chain rule through the merge gives dLoss/dalpha. Everything else (the
// MoE's experts, attention, embeddings, norms, head) stays frozen; the router is dropped.
//
// Include after train_moe.cpp (it drives that file's Model). Used by `upcycle --method merge`
// (upcycle.cu) and test/test_gradcheck.cpp (alpha's gradient by finite differences).
//
// defines: XftMerger
#pragma once
#include <cmath>
#include <string>
#include <vector>
#include "upcycle_ops.h"  // defines: softmax_of, xft_merge_matrix, xft_merge_alpha_grad

struct XftMerger {
    Model moe;    // the trained MoE: shared expert + E routed experts of the same width
    Model dense;  // the merged model: the MoE's non-FFN tensors, FFNs = the merges
    double lambda = 0.75;
    std::vector<std::vector<double>> alpha;  // [L][E] mixing logits (init 0: uniform m = 1/E)
    std::vector<std::vector<double>> adam_m, adam_v;  // [L][E] Adam moments of alpha
    long adam_t = 0;

    // Loads the MoE directory and builds the dense model at alpha = 0.
    void init(const std::string& moe_dir, double lambda_) {
        lambda = lambda_;
        if (!(lambda >= 0 && lambda <= 1)) FAIL("--merge-lambda %g is outside [0, 1]", lambda);
        moe.training = false;
        moe.load(moe_dir);
        const ModelConfig& c = moe.cfg;
        if (!c.is_moe() || !c.has_shared())
            FAIL("%s: --method merge needs an MoE with a shared expert (XFT: upcycle --method xft, then train), found %s",
                 moe_dir.c_str(), c.is_moe() ? "no shared expert" : "a dense model");
        if (c.shared_dim != c.ffn_dim)
            FAIL("%s: --method merge needs the shared expert as wide as each routed expert (the merge adds their "
                 "matrices), found shared_expert_intermediate_size %d and moe_intermediate_size %d",
                 moe_dir.c_str(), c.shared_dim, c.ffn_dim);
        ModelConfig dc = c;  // a Llama of the same shape, FFN width F_e
        dc.n_experts = 0;
        dc.top_k = 0;
        dc.routing = ROUTING_TOPK_SOFTMAX;
        dc.shared_dim = 0;
        dc.shared_gate = true;
        dc.validate("merged dense model");
        dense.cfg = dc;
        dense.init_layout();
        dense.params.assign(dense.layout.total, 0);
        for (auto& t : dense.layout.tensors) {  // every non-FFN tensor: the MoE's, by name
            if (t.kind == P_GATE || t.kind == P_UP || t.kind == P_DOWN) continue;
            const ParamTensor* s = nullptr;
            for (auto& u : moe.layout.tensors)
                if (u.name == t.name) s = &u;
            if (!s || s->numel != t.numel) FAIL("%s: no tensor \"%s\" of %zu entries", moe_dir.c_str(), t.name.c_str(), t.numel);
            std::copy(moe.params.begin() + s->offset, moe.params.begin() + s->offset + t.numel, dense.params.begin() + t.offset);
        }
        alpha.assign(c.n_layer, std::vector<double>(c.n_experts, 0.0));
        adam_m = adam_v = alpha;
        adam_t = 0;
        set_ffns();
    }
    // the layer's three matrices of the shared expert / routed expert e
    const real* shared_mat(int l, int mat) { return moe.param(l, (ParamKind)(P_SGATE + mat)); }
    const real* expert_mat(int l, int e, int mat) { return moe.param(moe.layout.experts[l][e][mat]); }
    size_t mat_numel(int l, int mat) const { return dense.layout.get(l, (ParamKind)(P_GATE + mat)).numel; }

    // the dense FFNs from the current alpha
    void set_ffns() {
        for (int l = 0; l < dense.cfg.n_layer; l++) {
            const std::vector<double> m = softmax_of(alpha[l]);
            for (int mat = 0; mat < 3; mat++) {
                std::vector<const real*> X;
                for (int e = 0; e < moe.cfg.n_experts; e++) X.push_back(expert_mat(l, e, mat));
                xft_merge_matrix(dense.param(l, (ParamKind)(P_GATE + mat)), shared_mat(l, mat), X, m, lambda,
                                 mat_numel(l, mat));
            }
        }
    }
    // The merged model's loss (cross-entropy) on a batch and, if galpha, dLoss/dalpha [L][E].
    double loss_and_grad(const int* in, const int* tg, int B, int T, std::vector<std::vector<double>>* galpha) {
        set_ffns();
        Losses ls = dense.forward(in, tg, B, T);
        if (!galpha) return ls.loss;
        dense.zero_grad();
        dense.backward();
        galpha->assign(dense.cfg.n_layer, {});
        for (int l = 0; l < dense.cfg.n_layer; l++) {
            std::vector<const real*> G;
            std::vector<std::vector<const real*>> X(3);
            std::vector<size_t> n;
            for (int mat = 0; mat < 3; mat++) {
                G.push_back(dense.grad(l, (ParamKind)(P_GATE + mat)));
                for (int e = 0; e < moe.cfg.n_experts; e++) X[mat].push_back(expert_mat(l, e, mat));
                n.push_back(mat_numel(l, mat));
            }
            (*galpha)[l] = xft_merge_alpha_grad(G, X, n, softmax_of(alpha[l]), lambda);
        }
        return ls.loss;
    }
    // One Adam step on alpha (betas 0.9, 0.999, eps 1e-8, no weight decay: alpha are mixing
    // logits, not weights); returns the loss before the step.
    double step(const int* in, const int* tg, int B, int T, double lr) {
        std::vector<std::vector<double>> g;
        const double loss = loss_and_grad(in, tg, B, T, &g);
        adam_t++;
        const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
        const double c1 = 1 - std::pow(b1, (double)adam_t), c2 = 1 - std::pow(b2, (double)adam_t);
        for (size_t l = 0; l < alpha.size(); l++)
            for (size_t e = 0; e < alpha[l].size(); e++) {
                adam_m[l][e] = b1 * adam_m[l][e] + (1 - b1) * g[l][e];
                adam_v[l][e] = b2 * adam_v[l][e] + (1 - b2) * g[l][e] * g[l][e];
                alpha[l][e] -= lr * (adam_m[l][e] / c1) / (std::sqrt(adam_v[l][e] / c2) + eps);
            }
        return loss;
    }
};
