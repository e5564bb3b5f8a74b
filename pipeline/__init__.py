"""segpipe: 3D medical-image segmentation on MONAI.

The stages, each a ``segpipe`` command, and the modules that serve them (``segpipe X`` lives in
``X.py`` where there is one module; each stage leaves one readable file for the next):

=================  =============================================  ==================================
stage              modules                                        leaves
=================  =============================================  ==================================
``synth``          synthetic                                      studies + ``dataset.json``
``validate``       manifest, validation, studies                  every problem, one line each;
                                                                  ``splits.json`` (``--folds``)
``fingerprint``    fingerprint                                    ``fingerprint.json``
``plan``           plan                                           ``plan.json``
``train``          train, handlers, loaders, transforms,          ``model.pt``, checkpoints,
                   weightmap, losses, networks, checkpoints,      ``val_cases.csv``,
                   tracking, qc, progress, system_metrics,        ``progress.png``, an MLflow
                   mlflow_model, amp                              run and model
``crossval``       crossval, crossval_score, crossval_export,     ``crossval.json``, ``oof/``, fold
                   ensemble                                       weights in the bundle
``predict``        predict, predict_io, inference, postprocess,   ``<id>.nii.gz`` + ``report.csv``,
                   predict_outputs, dicom_series, dicom_seg,      ``<id>.seg.dcm``, ``index.html``
                   preview
``evaluate``       evaluation                                     ``metrics.csv``, summary JSON
``ui`` / ``demo``  ui / demo                                      the MLflow UI / the whole path
=================  =============================================  ==================================

Shared by all: ``cli`` (the command), ``bundle`` (the one place bundles are parsed), ``errors``
(one-line errors and exit codes), ``fileio`` (atomic writes, NIfTI labels), ``amp`` (the one
precision policy), ``figures`` (the weight-map figure).
"""

__version__ = "0.1.0"
