//! Evaluation: metrics of a model over a labelled image–caption set — zero-shot accuracy with
//! prompt templates, image–text retrieval recall, and for Q-Formers ITM-reranked retrieval and
//! caption word accuracy. Pure functions of embeddings and scores, plus the drivers that run a
//! pipeline over an [`report::EvalSet`]. Imports infer, data and below; never train or the CLI.

pub mod qformer;
pub mod report;
pub mod retrieval;
pub mod zeroshot;
