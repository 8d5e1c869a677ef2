"""Datasets: embedded defaults (digits, text corpora), synthetic tasks, local archives (CIFAR)."""

from growjax.data.cifar import (CIFAR_URL, channel_mean_std, cifar_label_names, load_cifar,
                                safe_unpickle, write_tiny_cifar_archive)
from growjax.data.digits import load_digits
from growjax.data.splits import Dataset, Splits, batches, stratified_split
from growjax.data.synthetic import (Teacher, TeacherStudent, load_teacher_student,
                                    make_teacher)
from growjax.data.text import (DOMAINS, Document, LMSplits, Tokenizer, byte_tokenizer,
                               lm_as_splits, lm_windows, load_documents, load_text_lm,
                               load_tokenizer, random_windows, train_bpe)

__all__ = [
    "CIFAR_URL",
    "DOMAINS",
    "Dataset",
    "Document",
    "LMSplits",
    "Splits",
    "Teacher",
    "TeacherStudent",
    "Tokenizer",
    "batches",
    "byte_tokenizer",
    "channel_mean_std",
    "cifar_label_names",
    "lm_as_splits",
    "lm_windows",
    "load_cifar",
    "load_digits",
    "load_documents",
    "load_teacher_student",
    "load_text_lm",
    "load_tokenizer",
    "make_teacher",
    "random_windows",
    "safe_unpickle",
    "stratified_split",
    "train_bpe",
    "write_tiny_cifar_archive",
]
